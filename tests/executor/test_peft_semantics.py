"""PEFT's LoraConfig, field by field: served exactly as PEFT serves it, or refused by name (issue 29).

Served adapters are checked against transformers+PEFT (greedy tokens and logits, mixed in one batch
with another adapter and the base model); refused ones for a message that names the field and the
fix. The table in docs/vllm-compat.md is checked against the code's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loramux.executor.lora import REFUSED_FIELDS, SERVED_FIELDS, _check_config
from tests.executor.test_equality import assert_equal, make_llm, prompts, run
from tests.hf_factory import VOCAB, PeftOracle, TinyModel

ROOT = Path(__file__).resolve().parents[2]


def _peft_adapter(tm, out: Path, seed: int, **kw) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tm.path)
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
    with (
        torch.no_grad()
    ):  # these start as copies of the base (DoRA: a scale of 1): move them, as training does
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.randn_like(p))
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


class SoloOracle:
    """transformers+PEFT one row at a time, each adapter in a PeftModel of its own (PEFT refuses
    `adapter_names` batches with DoRA, and one model cannot hold trained tokens over an embedding
    LoRA); the base model alone for base rows."""

    def __init__(self, tm: TinyModel) -> None:
        self.tm = tm
        self.models: dict = {}

    def _model(self, name):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if name not in self.models:
            base = AutoModelForCausalLM.from_pretrained(self.tm.path, dtype=torch.float32)
            model = base if name is None else PeftModel.from_pretrained(base, self.tm.adapters[name])
            self.models[name] = model.eval()
        return self.models[name]

    def greedy(self, prompts, adapters, n):
        import torch

        tokens, logits = [], []
        for p, name in zip(prompts, adapters, strict=True):
            model, seq, rows = self._model(name), torch.tensor([p]), []
            if name is not None and getattr(model.active_peft_config, "alora_invocation_tokens", None):
                # activated LoRA: PEFT's generate finds the invocation in the prompt once
                with torch.no_grad():
                    out = model.generate(
                        input_ids=seq, max_new_tokens=n, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, pad_token_id=0,
                    )  # fmt: skip
                tokens.append(out.sequences[0, len(p) :].tolist())
                logits.append([step[0].float() for step in out.logits])
                continue
            for _ in range(n):
                with torch.no_grad():
                    row = model(input_ids=seq).logits[0, -1].float()
                rows.append(row)
                seq = torch.cat([seq, row.argmax().view(1, 1)], dim=1)
            tokens.append(seq[0, len(p) :].tolist())
            logits.append(rows)
        return tokens, logits


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


_DROP = object()


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """Adapters PEFT made whose configs loramux used to get wrong or refuse needlessly."""
    tm = tiny_models["llama"]
    root = tmp_path_factory.mktemp("peft_semantics")
    qv = ["q_proj", "v_proj"]
    made = _peft_adapter(tm, root / "made", 11, r=16, lora_alpha=32, target_modules=qv)
    adapters = {
        # no lora_alpha in the file: PEFT reads its default, 8 (scale 0.5 at r = 16), not r
        "no_alpha": _edit_config(made, root / "no_alpha", lora_alpha=_DROP),
        # bias="all" on a model with no biases: nothing but LoRA was trained, PEFT serves it so
        "bias_all": _peft_adapter(tm, root / "bias_all", 12, r=4, target_modules=qv, bias="all"),
        "r8_all": tm.adapters["r8_all"],
        "dora_qv": _peft_adapter(tm, root / "dora_qv", 13, r=4, target_modules=qv, use_dora=True),
        "dora_all": _peft_adapter(
            tm, root / "dora_all", 14, r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"
        ),
        "emb": _peft_adapter(tm, root / "emb", 15, r=8, target_modules=["embed_tokens", "q_proj"]),
        "head": _peft_adapter(tm, root / "head", 16, r=4, target_modules=qv, modules_to_save=["lm_head"]),
        "toks": _peft_adapter(
            tm, root / "toks", 17, r=4, target_modules=qv, trainable_token_indices=list(range(3, 512, 4))
        ),
    }
    return TinyModel("llama", tm.path, adapters)


def test_S1_1_defaults_and_needless_refusals_are_served_as_peft_serves_them(served):
    names = [None, "no_alpha", "bias_all", "r8_all", "no_alpha"]
    ps = prompts(len(names), 10, seed=3)
    tokens, logits, _ = run(make_llm(served), served, ps, names)
    plain = TinyModel("llama", served.path, {n: served.adapters[n] for n in names if n})
    assert_equal(PeftOracle(plain), ps, names, tokens, logits)  # PEFT's own mixed batch
    assert tokens[1] != tokens[0], "the adapter without lora_alpha should change the base output"


def test_S1_1_dora_rows_mixed_with_lora_and_base_rows_equal_peft(served):
    """Prefill chunks and decodes (the two LoRA paths), DoRA and plain LoRA slots side by side."""
    names = ["dora_qv", None, "dora_all", "r8_all", "dora_qv", "dora_all", "no_alpha"]
    ps = prompts(len(names), 11, seed=4)
    llm = make_llm(served, max_loras=4)
    tokens, logits, _ = run(llm, served, ps, names)
    assert_equal(SoloOracle(served), ps, names, tokens, logits)
    assert tokens[0] != tokens[1] and tokens[2] != tokens[1], "DoRA adapters should change the output"


def test_S1_1_embedding_lora_trained_tokens_and_a_trained_lm_head_mix_with_the_rest_as_peft(served):
    """Each row its own vocabulary parts: a LoRA on embed_tokens, trained token rows, a whole
    trained lm_head, beside plain LoRA, DoRA and base rows, over prefill chunks and decodes."""
    names = ["emb", None, "head", "toks", "r8_all", "dora_qv", "emb", "head"]
    ps = prompts(len(names), 11, seed=6)
    llm = make_llm(served, max_loras=6)
    tokens, logits, _ = run(llm, served, ps, names)
    assert_equal(SoloOracle(served), ps, names, tokens, logits)
    for i in (0, 2, 3):
        assert tokens[i] != tokens[1], f"{names[i]} should change the base output"
    info = {a.name: a for a in llm.engine.list_loras()}
    vocab, hidden = VOCAB, 64
    assert info["head"].nbytes >= vocab * hidden * 4  # the whole lm_head counts in its bytes


def test_S1_1_dora_on_a_model_with_biases_equals_peft(tiny_models, tmp_path):
    """Qwen2's q/k/v biases: a DoRA row is g * (W x + s.BAx) + b, not g * (... + b)."""
    tm = tiny_models["qwen2"]
    adapters = {
        "dora": _peft_adapter(
            tm, tmp_path / "dora", 21, r=4, use_dora=True, target_modules=["q_proj", "v_proj"]
        ),
        "lora": tm.adapters["r1_qv"],
    }
    model = TinyModel("qwen2", tm.path, adapters)
    names = ["dora", None, "lora", "dora"]
    ps = prompts(len(names), 9, seed=5)
    tokens, logits, _ = run(make_llm(model), model, ps, names)
    assert_equal(SoloOracle(model), ps, names, tokens, logits)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("layer_replication", [[0, 1], [0, 2]], "train without layer_replication"),
        ("lora_bias", True, "train with lora_bias=false"),
        ("trainable_token_indices", [3, 4], "is set but the file holds no trained tokens"),
        ("modules_to_save", ["score"], "serves a trained lm_head only"),
        ("use_qalora", True, "pools its input in groups"),
        ("target_parameters", ["mlp.experts"], "target the linear layers instead"),
        ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
        ("init_lora_weights", "olora", "convert it to a plain LoRA with PEFT"),
        ("astra_config", {"cache_file": None}, "Astra adapters expect Astra's residual base weights"),
        ("lora_alpha", None, "lora_alpha is null; set it to the alpha"),
        ("some_future_config", {"on": True}, "a LoraConfig field loramux does not know"),
    ],
)
def test_S1_1_fields_loramux_does_not_serve_are_refused_by_name_with_the_fix(
    tiny_models, tmp_path, field, value, match
):
    llm = make_llm(tiny_models["llama"])
    d = _edit_config(tiny_models["llama"].adapters["r1_qv"], tmp_path / "x", **{field: value})
    with pytest.raises(ValueError, match=match) as err:
        llm.engine.add_lora("x", str(d))
    assert field in str(err.value)
    assert "x" not in llm.engine.lora_names()


def test_the_docs_table_lists_every_field_as_the_code_does():
    """docs/vllm-compat.md's LoraConfig table: each served field says served, each refused one refused."""
    import dataclasses

    from peft import LoraConfig

    text = (ROOT / "docs" / "vllm-compat.md").read_text()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `") and " | " in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in cells[0].split(","):  # a row may list several fields
                rows[name.strip().strip("`")] = cells[1]
    known = SERVED_FIELDS | set(REFUSED_FIELDS)
    for name in known - {"init_lora_weights"}:  # init: served unless it changed the base weights
        assert name in rows, f"docs/vllm-compat.md does not list LoraConfig.{name}"
        assert rows[name].startswith("served" if name in SERVED_FIELDS else "refused"), (name, rows[name])
    # A PEFT newer than the table (CI installs the newest) may have fields it does not list; the
    # rule above the table holds for them: set, they are refused, since they may change outputs.
    for name in {f.name for f in dataclasses.fields(LoraConfig)} - known:
        with pytest.raises(ValueError, match=f"{name}=.* a LoraConfig field loramux does not know"):
            _check_config({"peft_type": "LORA", name: {"set": True}}, ROOT)


def test_S1_1_vocabulary_parts_loramux_cannot_serve_exactly_are_refused(served, tmp_path):
    from safetensors.torch import load_file, save_file

    llm = make_llm(served)
    lora_head = _edit_config(served.adapters["r8_all"], tmp_path / "lora_head", target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"puts LoRA on lm_head.*modules_to_save"):
        llm.engine.add_lora("lora_head", str(lora_head))
    # an embedding LoRA saved over another base embedding (a resized or retrained vocabulary)
    other = _edit_config(served.adapters["emb"], tmp_path / "other_base")
    tensors = load_file(other / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0
    save_file(tensors, other / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="carries a base embedding that differs from this model's"):
        llm.engine.add_lora("other_base", str(other))
    assert llm.engine.lora_names() == []


CONFIGS = {  # LoraConfig kwargs of adapters PEFT makes, served exactly (issue 29's "12 that work")
    "all_linear": dict(r=8, target_modules="all-linear"),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "rank_pattern": dict(r=4, rank_pattern={"q_proj": 8}, target_modules=["q_proj", "v_proj"]),
    "alpha_pattern": dict(
        r=4, lora_alpha=4, alpha_pattern={"v_proj": 32}, target_modules=["q_proj", "v_proj"]
    ),
    "regex_targets": dict(r=4, target_modules=r".*\.(q_proj|down_proj)"),
    "some_layers": dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, target_modules=["k_proj"], layers_to_transform=[0], layers_pattern="layers"),
    "exclude": dict(r=4, target_modules="all-linear", exclude_modules=["down_proj", "up_proj"]),
    "dropout": dict(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]),
    "mlp_r32": dict(r=32, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("config", [*CONFIGS, "bf16_weights", "gaussian_init"])
def test_S1_1_each_served_configuration_equals_peft_in_a_mixed_batch(served, tmp_path, config):
    """Two prompts under the adapter, beside base rows and another adapter's rows, one batch."""
    import torch
    from safetensors.torch import load_file, save_file

    tm = served
    if config in CONFIGS:
        path = _peft_adapter(tm, tmp_path / config, 31, **CONFIGS[config])
    elif config == "bf16_weights":  # weights saved in bfloat16, served at the model's float32
        path = _peft_adapter(tm, tmp_path / config, 32, r=8, target_modules=["q_proj", "v_proj"])
        f = path / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    else:  # an initialisation that only starts training: the saved weights are what counts
        made = _peft_adapter(tm, tmp_path / "made", 33, r=4, target_modules=["v_proj"])
        path = _edit_config(made, tmp_path / config, init_lora_weights="gaussian")
    model = TinyModel("llama", tm.path, {config: path, "r8_all": tm.adapters["r8_all"]})
    names = [config, None, "r8_all", config]
    ps = prompts(len(names), 9, seed=7)
    tokens, logits, _ = run(make_llm(model), model, ps, names)
    assert_equal(SoloOracle(model), ps, names, tokens, logits)


def test_S1_1_activated_lora_applies_from_its_invocation_on_and_shares_the_base_kv_before_it(
    served, tmp_path
):
    """aLoRA as PEFT's generate serves it: the adapter from the last occurrence of the invocation
    tokens in the prompt on (the output too), the base model before it and everywhere when the
    prompt lacks them; the KV before the invocation is the base model's and is found in the base
    model's prefix cache."""
    inv = [7, 8, 9]
    path = _peft_adapter(
        served,
        tmp_path / "alora",
        41,
        r=8,
        target_modules=["q_proj", "v_proj", "o_proj"],
        alora_invocation_tokens=inv,
    )
    model = TinyModel("llama", served.path, {"alora": path, "r8_all": served.adapters["r8_all"]})
    prefix = prompts(1, 20, seed=8)[0]
    p_after = prefix + inv + [33, 44]  # invoked after a 20-token prefix
    p_twice = prefix[:10] + inv + prefix[10:] + inv  # two occurrences: the last one counts
    p_none = prefix + [5, 6]  # not invoked: the base model's output
    names = ["alora", "alora", "alora", None, "r8_all", None]
    ps = [p_after, p_twice, p_none, p_after, p_after, p_none]
    llm = make_llm(model)
    tokens, logits, _ = run(llm, model, ps, names)
    assert_equal(SoloOracle(model), ps, names, tokens, logits)
    assert tokens[0] != tokens[3], "invoked, the adapter should change the output"
    assert tokens[2] == tokens[5], "not invoked, the output is the base model's"
    # The base model's KV of the prefix, cached by a base request, serves the aLoRA request.
    llm = make_llm(model)
    run(llm, model, [prefix + [1, 2, 3, 4]], [None])
    _, _, outs = run(llm, model, [p_after], ["alora"])
    assert outs[0].num_cached_tokens == 20
    _, _, outs = run(llm, model, [p_after], ["r8_all"])  # a plain adapter has its own namespace
    assert outs[0].num_cached_tokens == 0


def test_S1_1_trained_biases_and_trained_tokens_on_a_tied_model_are_refused(tiny_models, tmp_path):
    """Qwen2 has q/k/v biases and an lm_head tied to the embedding."""
    tm = tiny_models["qwen2"]
    llm = make_llm(tm)
    biased = _peft_adapter(tm, tmp_path / "biased", 51, r=4, target_modules=["q_proj"], bias="all")
    with pytest.raises(
        ValueError, match=r"bias='all' trained the base model's biases .*train with bias='none'"
    ):
        llm.engine.add_lora("biased", str(biased))
    toks = _peft_adapter(
        tm, tmp_path / "toks", 52, r=4, target_modules=["q_proj"], trainable_token_indices=[3, 4]
    )
    with pytest.raises(ValueError, match="lm_head shares the embedding"):
        llm.engine.add_lora("toks", str(toks))
    assert llm.engine.lora_names() == []
