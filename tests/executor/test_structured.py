"""Structured output in the engine (issue 28, point 2), on a tiny random Llama through `LLM`.

The grammar is compiled off the step loop (a request waits for it, the step does not), masks are
applied to the batch in one op, each sample's matcher follows its tokens (also across preemption),
and it works with adapters, n > 1, penalties, logprobs, stop strings and prefix caching. The model
is random, so the grammars bound their answers: whatever it prefers, the answer must match.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams, StructuredOutputsParams
from loramux.engine.grammar import GrammarError, unenforced_keywords
from loramux.executor.sampler import apply_token_masks

REGEX = r"[a-z]{2,6}(-[0-9]{1,3})?"
SCHEMA = {
    "type": "object",
    "properties": {
        "w": {"type": "string", "maxLength": 5},
        "k": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["w", "k"],
    "additionalProperties": False,
}
PROMPTS = ["lora adapter serve", "cache fast fair batch", "token model"]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"].path), num_pages=256, page_size=4, device="cpu", seed=3, max_loras=2)


def regex_params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=40, structured_outputs=StructuredOutputsParams(regex=REGEX), **kw)


def texts(outs) -> list[str]:
    return [c.text for o in outs for c in o.outputs]


def test_token_masks_set_forbidden_tokens_to_minus_inf_on_their_rows_only():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    allowed = {0: [1, 33, 69], 2: [0, 31, 32]}  # rows 0 and 2 constrained; row 1 free
    for j, row in enumerate((0, 2)):
        for t in allowed[row]:
            bitmask[j, t // 32] |= 1 << (t % 32) if t % 32 != 31 else -(2**31)
    out = apply_token_masks(logits, [0, 2], bitmask)
    for row in (0, 2):
        finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert finite == allowed[row]
        assert torch.equal(out[row, allowed[row]], logits[row, allowed[row]])
    assert torch.equal(out[1], logits[1])


def test_every_answer_matches_with_adapters_n_penalties_and_logprobs_in_one_batch(llm, tiny_models):
    lora = LoRARequest("r8_all", 1, str(tiny_models["llama"].adapters["r8_all"]))
    params = [
        regex_params(temperature=1.0, n=3, seed=11, repetition_penalty=1.3, presence_penalty=0.5),
        regex_params(temperature=0.0, logprobs=3),
        SamplingParams(
            max_tokens=60,
            temperature=0.8,
            n=2,
            seed=5,
            frequency_penalty=0.7,
            structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        ),
    ]
    outs = llm.generate(PROMPTS, params, [lora, None, lora], use_tqdm=False)
    for text in texts(outs[:2]):
        assert re.fullmatch(REGEX, text), text
    for text in texts(outs[2:]):
        jsonschema.validate(json.loads(text), SCHEMA)
    for c in (*outs[0].outputs, *outs[2].outputs):
        assert c.finish_reason == "stop", c
    lps = outs[1].outputs[0].logprobs
    assert lps and all(lp.token_logprob > -1e9 for lp in lps)
    for lp, tok in zip(lps, outs[1].outputs[0].token_ids, strict=False):
        assert lp.top[0][0] == tok  # greedy: the most likely allowed token is the one taken
        # logprobs are of the masked distribution (as vLLM's): the allowed tokens' mass is 1
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-4


def test_a_new_grammar_waits_off_the_step_loop_while_other_requests_step(llm):
    """The compile worker is held busy: the constrained request waits outside the scheduler while
    a free request gets its tokens; once the worker is free the grammar compiles and it runs."""
    engine = llm.engine
    gate = threading.Event()
    engine._grammars._pool.submit(gate.wait, 30)  # the one compile worker is busy
    spec = StructuredOutputsParams(regex=r"(yes|no|maybe) [0-9]{2}")
    engine.add_request("held", "hello", SamplingParams(max_tokens=20, structured_outputs=spec))
    engine.add_request("free", "hello", SamplingParams(max_tokens=4, temperature=0))
    got: dict[str, list[int]] = {"held": [], "free": []}
    for _ in range(6):
        for out in engine.step():
            got[out.request_id] = out.outputs[0].token_ids
    assert len(got["free"]) == 4 and got["held"] == []  # the step went on; the request waited
    assert "held" not in engine.scheduler.requests
    gate.set()
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].text  # type: ignore[assignment]
    assert re.fullmatch(r"(yes|no|maybe) [0-9]{2}", got["held"]), got  # type: ignore[arg-type]


def test_matchers_follow_their_tokens_across_preemption(tiny_models):
    """A KV pool too small for all: requests are preempted and recompute; every answer still
    matches and equals the one made without preemption (greedy)."""
    path = str(tiny_models["llama"].path)
    params = SamplingParams(
        max_tokens=48,
        temperature=0,
        structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
    )
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    roomy = LLM(path, num_pages=512, page_size=4, device="cpu")
    expected = texts(roomy.generate(prompts, params, use_tqdm=False))
    tight = LLM(path, num_pages=40, page_size=4, device="cpu", max_num_seqs=12)
    got = texts(tight.generate(prompts, params, use_tqdm=False))
    assert tight.engine.scheduler.counters.num_preemptions > 0
    assert got == expected
    for text in got:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_stop_strings_cut_a_constrained_answer_and_prefix_caching_reuses_its_prompt(llm):
    spec = StructuredOutputsParams(choice=("alpha-beta", "gamma-delta"))
    params = SamplingParams(max_tokens=30, temperature=0, structured_outputs=spec, stop=["-"])
    prompt = "cache fast fair batch token model lora adapter serve " * 2
    first, second = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert first.outputs[0].text in ("alpha", "gamma") and first.outputs[0].stop_reason == "-"
    assert second.outputs[0].text == first.outputs[0].text
    assert second.num_cached_tokens > 0


def test_grammars_are_compiled_once_per_spec(llm):
    cache = llm.engine._grammars
    spec = StructuredOutputsParams(regex=r"[0-9]{3}")
    before = cache.num_compiled
    for _ in range(3):
        llm.generate(["hello"], SamplingParams(max_tokens=8, structured_outputs=spec), use_tqdm=False)
    assert cache.num_compiled == before + 1


@pytest.mark.parametrize(
    "spec,words",
    [
        (dict(json={"type": "integer", "minimum": 3, "maximum": 2}), "minimum greater than maximum"),
        (dict(json={"type": "array", "uniqueItems": True}), "#/uniqueItems"),
        (dict(regex="(?<=a)b"), "Lookbehind"),
        (dict(grammar='root ::= "a" b'), 'Rule "b" is not defined'),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_value_error_naming_it(llm, spec, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        llm.generate(
            ["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False
        )
    assert llm.generate(["hi"], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_structured_params_are_checked_when_made():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=("b",))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a"))
    same = StructuredOutputsParams(json={"type": "object"})
    assert same.key == StructuredOutputsParams(json='{"type": "object"}').key


def test_unenforced_keywords_are_found_where_they_are_keywords_not_property_names():
    schema = {
        "type": "object",
        "properties": {"if": {"type": "string"}, "xs": {"type": "array", "items": {"not": {"type": "null"}}}},
        "anyOf": [{"multipleOf": 3}],
    }
    assert unenforced_keywords(schema) == ["#/properties/xs/items/not", "#/anyOf/0/multipleOf"]


def test_json_answers_hold_no_raw_control_characters(llm):
    """xgrammar 0.2 lets a string with maxLength hold any byte but quote, backslash, CR and LF;
    loramux keeps tokens with raw control bytes out of JSON answers, so they parse strictly."""
    spec = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(max_tokens=80, temperature=1.5, n=24, seed=1, structured_outputs=spec)
    for text in texts(llm.generate(["lora adapter"], params, use_tqdm=False)):
        jsonschema.validate(json.loads(text), SCHEMA)  # json.loads is strict: no raw control chars


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_grammar_that_ends_before_min_tokens_ends_the_answer_and_the_engine_serves_on(llm, temperature):
    """Found by the semantic fuzzer: "[a-c]{1,3}" with min_tokens 3 (one BPE token can hold "ca")
    left only eos allowed while min_tokens suppressed it. The sampler then drew from nothing, and
    once the grammar took eos anyway the next mask raised and stopped the engine for everyone. The
    grammar wins: the answer ends with it, a free request in the same batch is unaffected."""
    so = StructuredOutputsParams(regex="[a-c]{1,3}")
    params = [
        SamplingParams(
            temperature=temperature, seed=1, max_tokens=16, min_tokens=12, logprobs=3, structured_outputs=so
        ),
        SamplingParams(temperature=temperature, seed=2, max_tokens=6, ignore_eos=True),
    ]
    outs = llm.generate(["hello", "hello"], params, use_tqdm=False)
    short, free = outs[0].outputs[0], outs[1].outputs[0]
    assert re.fullmatch("[a-c]{1,3}", short.text) and short.finish_reason == "stop"
    assert len(short.token_ids) < 12 and len(free.token_ids) == 6
    assert llm.generate(["again"], regex_params(), use_tqdm=False)[0].outputs[0].finish_reason
