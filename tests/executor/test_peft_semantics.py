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

from loramux.executor.lora import REFUSED_FIELDS, SERVED_FIELDS
from tests.executor.test_equality import assert_equal, make_llm, prompts, run
from tests.hf_factory import PeftOracle, TinyModel

ROOT = Path(__file__).resolve().parents[2]


def _peft_adapter(tm, out: Path, seed: int, **kw) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tm.path)
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
    with torch.no_grad():  # DoRA starts with magnitude = the norm (a scale of 1): move it, as training does
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


class SoloOracle(PeftOracle):
    """PEFT one row at a time (`set_adapter`, or the adapters disabled for the base model): PEFT
    refuses `adapter_names` batches once a DoRA adapter is loaded."""

    def greedy(self, prompts, adapters, n):
        import torch

        tokens, logits = [], []
        for p, name in zip(prompts, adapters, strict=True):
            seq, rows = torch.tensor([p]), []
            for _ in range(n):
                with torch.no_grad():
                    if name is None:
                        with self.model.disable_adapter():
                            row = self.model(input_ids=seq).logits[0, -1].float()
                    else:
                        self.model.set_adapter(name)
                        row = self.model(input_ids=seq).logits[0, -1].float()
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
    }
    return TinyModel("llama", tm.path, adapters)


def test_S1_1_defaults_and_needless_refusals_are_served_as_peft_serves_them(served):
    names = [None, "no_alpha", "bias_all", "r8_all", "no_alpha"]
    ps = prompts(len(names), 10, seed=3)
    tokens, logits, _ = run(make_llm(served), served, ps, names)
    assert_equal(PeftOracle(served), ps, names, tokens, logits)
    assert tokens[1] != tokens[0], "the adapter without lora_alpha should change the base output"


def test_S1_1_dora_rows_mixed_with_lora_and_base_rows_equal_peft(served):
    """Prefill chunks and decodes (the two LoRA paths), DoRA and plain LoRA slots side by side."""
    names = ["dora_qv", None, "dora_all", "r8_all", "dora_qv", "dora_all", "no_alpha"]
    ps = prompts(len(names), 11, seed=4)
    llm = make_llm(served, max_loras=4)
    tokens, logits, _ = run(llm, served, ps, names)
    assert_equal(SoloOracle(served), ps, names, tokens, logits)
    assert tokens[0] != tokens[1] and tokens[2] != tokens[1], "DoRA adapters should change the output"


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
        ("alora_invocation_tokens", [5, 6], "applies the adapter only from the invocation tokens on"),
        ("layer_replication", [[0, 1], [0, 2]], "train without layer_replication"),
        ("lora_bias", True, "train with lora_bias=false"),
        ("trainable_token_indices", [3, 4], "train without them"),
        ("use_qalora", True, "pools its input in groups"),
        ("target_parameters", ["mlp.experts"], "target the linear layers instead"),
        ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
        ("init_lora_weights", "olora", "convert it to a plain LoRA with PEFT"),
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
    peft_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for name in peft_fields - {"init_lora_weights"}:  # init: served unless it changed the base weights
        assert name in rows, f"docs/vllm-compat.md does not list LoraConfig.{name}"
        assert rows[name].startswith("served" if name in SERVED_FIELDS else "refused"), (name, rows[name])
    assert peft_fields <= SERVED_FIELDS | set(REFUSED_FIELDS), (
        peft_fields - SERVED_FIELDS - set(REFUSED_FIELDS)
    )
