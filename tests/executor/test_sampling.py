"""Sampling and stopping through the real engine: seeds, top-k/p, stop ids and strings, eos, logprobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams
from tests.utils import stop_across_chunks

PROMPT = [11, 42, 99, 7, 300, 12, 5, 77]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"].path), num_pages=128, page_size=4, device="cpu", seed=123)


def gen(llm, params, prompts=None, lora=None):
    return llm.generate(prompts or [PROMPT], params, lora_request=lora, use_tqdm=False)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_top_k_1_and_tiny_top_p(llm):
    greedy = tokens(gen(llm, SamplingParams(temperature=0, max_tokens=8)))
    assert tokens(gen(llm, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, seed=1))) == greedy
    assert tokens(gen(llm, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, seed=2))) == greedy


def test_seeded_sampling_is_reproducible_and_batch_independent(llm, tiny_models):
    sp = SamplingParams(temperature=1.5, max_tokens=12, seed=7)
    alone = tokens(gen(llm, sp))[0]
    again = tokens(gen(llm, sp))[0]
    lora = LoRARequest("r8_all", 1, str(tiny_models["llama"].adapters["r8_all"]))
    crowd = gen(
        llm,
        [sp, SamplingParams(temperature=1.0, max_tokens=12), SamplingParams(max_tokens=5)],
        prompts=[PROMPT, PROMPT[:5], PROMPT[2:]],
        lora=[None, lora, None],
    )
    assert alone == again == crowd[0].outputs[0].token_ids
    other = tokens(gen(llm, dataclasses.replace(sp, seed=8)))[0]
    assert other != alone


def test_unseeded_sampling_varies(llm):
    sp = SamplingParams(temperature=2.0, max_tokens=10)
    runs = {tuple(tokens(gen(llm, sp))[0]) for _ in range(4)}
    assert len(runs) > 1


def test_top_k_restricts_to_the_k_most_likely(llm):
    logits: dict[str, list[torch.Tensor]] = {}
    llm.engine.executor.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    try:
        out = gen(llm, SamplingParams(temperature=2.0, top_k=3, max_tokens=10, seed=3))[0]
    finally:
        llm.engine.executor.logits_hook = None
    for tok, row in zip(out.outputs[0].token_ids, logits[out.request_id], strict=True):
        assert tok in row.topk(3).indices.tolist()


def test_stop_token_ids_end_generation_and_are_reported(llm):
    ref = tokens(gen(llm, SamplingParams(temperature=0, max_tokens=8)))[0]
    stop = ref[3]
    first = ref.index(stop)
    out = gen(llm, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop


def test_max_tokens_and_length_reason(llm):
    out = gen(llm, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_eos_stops_unless_ignore_eos(llm):
    ref = tokens(gen(llm, SamplingParams(temperature=0, max_tokens=8)))[0]
    eos = ref[2]
    engine = llm.engine
    saved = engine.runtime
    engine.runtime = dataclasses.replace(saved, eos_token_ids=(eos,))  # pretend the model's eos is ref[2]
    try:
        stopped = gen(llm, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
        kept = gen(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
        late = gen(llm, SamplingParams(temperature=0, max_tokens=8, min_tokens=6))[0].outputs[0]
    finally:
        engine.runtime = saved
    assert stopped.token_ids == ref[: ref.index(eos) + 1] and stopped.finish_reason == "stop"
    assert kept.token_ids == ref and kept.finish_reason == "length"
    assert len(late.token_ids) >= 6


@pytest.mark.parametrize(
    "mode",
    [
        dict(temperature=0),
        dict(temperature=1.0, top_k=1, seed=5),  # seeded generator path
        dict(temperature=1.0, top_p=1e-6),  # shared generator path
    ],
)
def test_min_tokens_masks_eos_and_stop_ids_until_reached(llm, mode):
    """vLLM's min_tokens: eos and stop ids cannot be sampled before min_tokens outputs exist;
    after that they stop the request as usual (issue 12, point 2)."""
    ref = tokens(gen(llm, SamplingParams(max_tokens=8, **mode)))[0]
    engine, saved = llm.engine, llm.engine.runtime
    engine.runtime = dataclasses.replace(saved, eos_token_ids=(ref[0],))  # the model's first pick is eos
    try:
        plain = gen(llm, SamplingParams(max_tokens=8, **mode))[0].outputs[0]
        held = gen(llm, SamplingParams(max_tokens=8, min_tokens=2, **mode))[0].outputs[0]
    finally:
        engine.runtime = saved
    assert plain.token_ids == [ref[0]] and plain.finish_reason == "stop"  # eos at once without it
    assert ref[0] not in held.token_ids[:2] and len(held.token_ids) >= 2
    stop_held = gen(llm, SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=[ref[0]], **mode))
    assert stop_held[0].outputs[0].token_ids[0] != ref[0]


def test_stop_strings_cut_the_text(llm):
    tok = llm.get_tokenizer()
    ref = gen(llm, SamplingParams(temperature=0, max_tokens=16), prompts=["hello world"])[0].outputs[0]
    text = ref.text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    out = gen(llm, SamplingParams(temperature=0, max_tokens=16, stop=[stop]), prompts=["hello world"])[0]
    o = out.outputs[0]
    assert o.text == text[:cut] and o.finish_reason == "stop" and o.stop_reason == stop
    sp = SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True)
    keep = gen(llm, sp, prompts=["hello world"])[0].outputs[0]
    assert keep.text == text[: cut + len(stop)]
    assert tok.decode(ref.token_ids) == text  # incremental detokenization equals a one-shot decode


def test_logprobs_are_the_raw_distribution(llm):
    logits: dict[str, list[torch.Tensor]] = {}
    llm.engine.executor.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    try:
        out = gen(llm, SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    finally:
        llm.engine.executor.logits_hook = None
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 4
    for tok, lp, row in zip(out.outputs[0].token_ids, lps, logits[out.request_id], strict=True):
        ref = row.log_softmax(-1)
        assert abs(lp.token_logprob - ref[tok].item()) < 1e-5
        assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist() and lp.top[0][0] == tok


def test_text_prompts_tokenize_like_the_tokenizer(llm):
    tok = llm.get_tokenizer()
    by_text = gen(llm, SamplingParams(temperature=0, max_tokens=6), prompts=["the quick brown fox"])[0]
    by_ids = gen(
        llm,
        SamplingParams(temperature=0, max_tokens=6),
        prompts=[{"prompt_token_ids": tok.encode("the quick brown fox")}],
    )[0]
    assert by_text.prompt_token_ids == tok.encode("the quick brown fox")
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt == "the quick brown fox"


def test_generate_shows_a_progress_bar_on_batches(llm, capsys):
    llm.generate([PROMPT, PROMPT[1:], PROMPT[2:]], SamplingParams(max_tokens=2))
    assert "generating" in capsys.readouterr().err


def test_min_p_keeps_only_tokens_near_the_most_likely_one(llm):
    """vLLM's min_p, after temperature and before top-k/top-p: a sampled token is at least
    min_p times as likely as the most likely one under the temperature-scaled distribution; rows
    without min_p in the same batch keep every token (it was refused by name)."""
    logits: dict[str, list[torch.Tensor]] = {}
    llm.engine.executor.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    try:
        outs = gen(
            llm,
            [
                SamplingParams(temperature=0.5, min_p=0.5, max_tokens=12, seed=s, ignore_eos=True)
                for s in range(6)
            ]
            + [SamplingParams(temperature=0.5, max_tokens=12, seed=s, ignore_eos=True) for s in range(6)],
            [PROMPT] * 12,
        )
    finally:
        llm.engine.executor.logits_hook = None

    def below(out) -> int:  # sampled tokens under 0.5 x the most likely one's probability
        n = 0
        for tok, row in zip(out.outputs[0].token_ids, logits[out.request_id], strict=True):
            p = (row / 0.5).softmax(-1)
            n += int(p[tok] < 0.5 * p.max())
        return n

    assert sum(below(o) for o in outs[:6]) == 0
    assert sum(below(o) for o in outs[6:]) > 0  # without min_p such tokens do come up
    with pytest.raises(ValueError, match=r"min_p=1\.5"):
        SamplingParams(min_p=1.5)


def test_truncate_prompt_tokens_keeps_the_prompts_last_k(llm):
    """vLLM's truncate_prompt_tokens (left truncation; it was refused by name): the request runs on
    the prompt's last k tokens, as if it had been sent alone; a k past the prompt keeps it whole."""
    cut = gen(llm, SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=3))[0]
    alone = gen(llm, SamplingParams(temperature=0, max_tokens=4), [PROMPT[-3:]])[0]
    assert cut.prompt_token_ids == PROMPT[-3:] and tokens([cut]) == tokens([alone])
    whole = gen(llm, SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=50))[0]
    assert whole.prompt_token_ids == PROMPT
    with pytest.raises(ValueError, match="truncate_prompt_tokens=0"):
        SamplingParams(truncate_prompt_tokens=0)


def test_bad_sampling_params_name_the_value():
    with pytest.raises(ValueError, match="temperature=3"):
        SamplingParams(temperature=3)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="logprobs=21"):
        SamplingParams(logprobs=21)


def stream(engine, prompt, params) -> tuple[list[str], object]:
    """Run one request through the engine's step loop: its text deltas and its final output."""
    rid = engine.add_request(None, prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                deltas.append(out.outputs[0].delta_text)
                final = out
    return deltas, final


@pytest.mark.parametrize("include", [False, True])
def test_streamed_deltas_join_to_the_final_text_with_a_stop_string(llm, include):
    """Deltas never show the start of a stop string that later matches (issue 12, point 1)."""
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref, _ = stream(llm.engine, "hello world", base)
    stop = stop_across_chunks(ref)
    params = dataclasses.replace(base, stop=(stop,), include_stop_str_in_output=include)
    deltas, final = stream(llm.engine, "hello world", params)
    assert final is not None and final.finished and final.outputs[0].stop_reason == stop
    text = final.outputs[0].text
    assert text.endswith(stop) == include and stop not in text[: len(text) - len(stop) * include]
    assert "".join(deltas) == text


# --- penalties and logit_bias (issue 16, point 2) ---------------------------------------------------


def reference_penalized(logits, p, context, n_prompt):
    """The formulas, one row and one token at a time: logit_bias, then repetition (HF/vLLM: divide
    positive logits, multiply negative ones, for every token seen in prompt or output), then
    OpenAI's frequency (per occurrence in the output) and presence (once) penalties."""
    row = logits.clone()
    for t, b in p.logit_bias:
        row[t] += b
    seen, out = set(context), context[n_prompt:]
    for t in range(row.shape[0]):
        if t in seen:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        c = out.count(t)
        row[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return row


def test_batched_penalties_and_bias_equal_the_reference_formulas():
    from loramux.executor.sampler import apply_logit_bias, apply_penalties

    g = torch.Generator().manual_seed(0)
    vocab, rows = 50, 6
    logits = torch.randn(rows, vocab, generator=g) * 3
    params, histories = [], []
    for i in range(rows):
        ctx = torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist()
        penalized = i % 3 != 2  # some rows without penalties in the same batch
        params.append(
            SamplingParams(
                presence_penalty=0.5 * (i % 3) if penalized else 0.0,
                frequency_penalty=0.3 if penalized else 0.0,
                repetition_penalty=1.3 if i % 2 else (1.0 if not penalized else 0.8),
                logit_bias={i: 5.0, 40: -7.5} if i % 2 else {},
            )
        )
        histories.append((ctx, 4) if params[-1].penalized else None)
    got = apply_penalties(apply_logit_bias(logits, params), params, histories)
    for i in range(rows):
        ctx, n_prompt = histories[i] or ([], 0)
        want = reference_penalized(logits[i], params[i], ctx, n_prompt)
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_penalties_and_bias_steer_greedy_decoding_as_the_formulas_say(llm):
    """Through the real engine: each greedy token is the argmax of the reference-penalized raw
    logits given everything before it; and a +100 bias forces its token."""
    raw: list[torch.Tensor] = []
    llm.engine.executor.logits_hook = lambda rid, row: raw.append(row.clone())
    try:
        p = SamplingParams(
            temperature=0,
            max_tokens=10,
            ignore_eos=True,
            presence_penalty=1.5,
            frequency_penalty=0.7,
            repetition_penalty=1.4,
        )
        out = gen(llm, p)[0].outputs[0].token_ids
        plain = tokens(gen(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)))[0]
    finally:
        llm.engine.executor.logits_hook = None
    context = list(PROMPT)
    for step, tok in enumerate(out):
        want = reference_penalized(raw[step], p, context, len(PROMPT))
        assert tok == int(want.argmax()), step
        context.append(tok)
    assert out != plain  # the penalties changed the answer here
    forced = tokens(
        gen(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={77: 100.0}))
    )
    assert forced[0] == [77] * 5


def test_n_samples_share_the_prompts_kv_and_follow_their_seeds(llm):
    """n samples of one prompt: one RequestOutput with n completions; sample i equals a single
    request seeded seed + i; the later samples find the prompt's pages in the prefix cache."""
    prompt = [17, 33, 250, 9, 41, 60, 71, 88, 93, 101, 120, 130, 140]  # 13 tokens: 3 full pages of 4
    sp = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=11, n=3)
    out = gen(llm, sp, prompts=[prompt])
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    for i, comp in enumerate(out[0].outputs):
        alone = gen(llm, dataclasses.replace(sp, n=1, seed=11 + i), prompts=[prompt])
        assert comp.token_ids == alone[0].outputs[0].token_ids
    engine = llm.engine
    ids = engine.add_request_n("share", [7, *prompt], dataclasses.replace(sp, seed=None))
    cached = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                cached[o.request_id] = o.num_cached_tokens
    assert cached[ids[0]] == 0 and all(cached[r] == 12 for r in ids[1:])  # 3 pages, shared


def test_a_prompt_dicts_cache_salt_keeps_its_kv_to_its_salt_and_n_samples_share_it(llm):
    """vLLM's prompt dict {"prompt_token_ids": ..., "cache_salt": ...} in LLM.generate: another
    salt (or none) misses the pages a salted prompt cached, the same salt hits them, and the n
    samples of a salted prompt share its pages (they follow it in its salted namespace)."""
    prompt = [5, 16, 27, 38, 49, 61, 72, 83, 94, 105, 116, 127, 138]  # 3 full pages of 4
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def cached(salt: str | None, params: SamplingParams = sp) -> list[int]:
        p = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        (out,) = llm.generate([p], params, use_tqdm=False)
        return [out.num_cached_tokens]

    assert cached("a") == [0]
    assert cached("b") == [0] and cached(None) == [0]
    assert cached("a") == [12]
    engine = llm.engine
    ids = engine.add_request_n("salted", prompt + [7], dataclasses.replace(sp, n=3), cache_salt="c")
    got = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                got[o.request_id] = o.num_cached_tokens
    assert got[ids[0]] == 0 and all(got[r] == 12 for r in ids[1:])


def test_allowed_token_ids_and_bad_words_match_peft_with_hfs_processors(tiny_models):
    """vLLM's allowed_token_ids and bad_words, per adapter in one mixed batch, against
    transformers + PEFT greedy with transformers' own NoBadWordsLogitsProcessor (given the output
    so far, as vLLM matches bad words in the output only) and the allowed ids as a mask. Each
    bad word is two tokens of the row's free answer, so the ban has something to change."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    from tests.hf_factory import PeftOracle

    tm = tiny_models["llama"]
    llm = LLM(str(tm.path), device="cpu", num_pages=128, page_size=4, max_loras=2)
    tok = llm.get_tokenizer()
    adapters = [None, "r8_all", "r1_qv"]
    loras = [
        None if a is None else LoRARequest(a, i + 1, str(tm.adapters[a])) for i, a in enumerate(adapters)
    ]
    prompts = [PROMPT, PROMPT[2:] + [40, 41], [300, 301, 302, 12, 13, 14]]
    n = 10
    free = tokens(
        llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), loras, use_tqdm=False
        )
    )

    def two_token_word(ids: list[int]) -> str:
        """Two tokens of an answer whose text encodes back to them (the random model writes junk)."""
        for i in range(1, len(ids) - 1):
            w = tok.decode(ids[i : i + 2])
            if tok.encode(w.lstrip(), add_special_tokens=False) == ids[i : i + 2]:
                return w
        raise AssertionError(f"no two tokens of {ids} encode back from their text")

    words = [two_token_word(f) for f in free]
    allowed = [None, [10, 20, 30, 40, 300], [int(t) for t in free[2]] + [7]]
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, bad_words=[w], allowed_token_ids=a)
        for w, a in zip(words, allowed, strict=True)
    ]
    got = tokens(llm.generate(prompts, params, loras, use_tqdm=False))

    oracle = PeftOracle(tm)
    for prompt, adapter, word, ids, row in zip(prompts, adapters, words, allowed, got, strict=True):
        seqs = {tuple(tok.encode(v, add_special_tokens=False)) for v in (word.lstrip(), " " + word.lstrip())}
        ban = NoBadWordsLogitsProcessor([list(s) for s in seqs], eos_token_id=None)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(n):
                logits = oracle.model(
                    input_ids=torch.tensor([prompt + out]), adapter_names=[adapter or "__base__"]
                )
                scores = ban(torch.tensor([out], dtype=torch.long), logits.logits[:, -1].float())
                if ids is not None:
                    keep = torch.zeros_like(scores, dtype=torch.bool)
                    keep[0, ids] = True
                    scores = scores.masked_fill(~keep, float("-inf"))
                out.append(int(scores.argmax(-1)))
        assert row == out, (adapter, word)
    assert all(g != f for g, f in zip(got, free, strict=True))  # every row's constraint changed its answer
    assert set(got[1]) <= set(allowed[1])


def test_allowed_token_ids_outrank_min_tokens_and_bad_words_and_yield_to_a_grammar(llm):
    """A request's constraints that leave no token: allowed_token_ids that hold only a stop id
    before min_tokens, or only a banned word, keep what they allow (the other masks yield, as
    min_tokens yields to a grammar's end); a grammar that allows none of them wins over them, so
    the answer still parses. Without this, sampling an empty distribution failed the request."""
    from loramux import StructuredOutputsParams

    tok = llm.get_tokenizer()
    free = tokens(gen(llm, SamplingParams(temperature=0, max_tokens=3)))[0]
    stop = free[0]
    held = gen(
        llm,
        SamplingParams(
            temperature=0, max_tokens=4, min_tokens=2, stop_token_ids=[stop], allowed_token_ids=[stop]
        ),
    )
    # the stop id is sampled (nothing else may be), and it stops once min_tokens are out
    assert held[0].outputs[0].token_ids == [stop, stop] and held[0].outputs[0].finish_reason == "stop"
    word = tok.decode([stop]).strip()
    only = tok.encode(word, add_special_tokens=False)[0]
    sp = SamplingParams(temperature=1.0, max_tokens=3, seed=1, bad_words=[word], allowed_token_ids=[only])
    assert tokens(gen(llm, sp))[0] == [only] * 3
    choice = StructuredOutputsParams(choice=("lora", "cache"))
    stranger = next(t for t in range(5, 500) if tok.decode([t]).strip().isdigit())
    for temperature in (0.0, 1.0):
        sp = SamplingParams(
            temperature=temperature, max_tokens=12, structured_outputs=choice, allowed_token_ids=[stranger]
        )
        out = gen(llm, sp)[0].outputs[0]
        assert out.text in ("lora", "cache") and out.finish_reason == "stop", out
