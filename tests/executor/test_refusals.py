"""Adapters and models loramux cannot run are refused with an error that names the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"].path), num_pages=64, page_size=4, max_lora_rank=32, device="cpu")


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refuse(llm, path, match):
    with pytest.raises(ValueError, match=match):
        llm.engine.add_lora("bad", str(path))
    assert "bad" not in llm.engine.scheduler.adapters


def test_missing_directory_and_files(llm, tiny_models, tmp_path):
    refuse(llm, tmp_path / "nowhere", "is not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse(llm, empty, "no adapter_config.json; point at a PEFT LoRA directory")
    no_weights = copy_adapter(tiny_models["llama"].adapters["r1_qv"], tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    refuse(llm, no_weights, "has no adapter_model.safetensors")


def test_bin_weights_are_refused_with_the_conversion(llm, tiny_models, tmp_path):
    d = copy_adapter(tiny_models["llama"].adapters["r1_qv"], tmp_path / "bin")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    refuse(llm, d, r"adapter_model.bin; loramux reads safetensors only. Convert with")


def test_rank_above_max_lora_rank(llm, tiny_models):
    refuse(llm, tiny_models["llama"].adapters["r64_mlp"], r"rank 64 .*--max-lora-rank 64")


def make_peft(tm, tmp_path, name, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tm.path)
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_target_module_the_model_does_not_have(llm, tiny_models, tmp_path):
    d = copy_adapter(tiny_models["llama"].adapters["r1_qv"], tmp_path / "gpt2ish")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "q_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    refuse(llm, d, r"targets \['c_attn'\], which the model does not have")


def test_shapes_that_do_not_fit_the_model(llm, tiny_models, tmp_path):
    other = tiny_models["llama"].adapters["r8_all"]
    d = copy_adapter(other, tmp_path / "wide")
    from safetensors.torch import load_file, save_file

    w = load_file(str(d / "adapter_model.safetensors"))
    w = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v for k, v in w.items()}
    save_file(w, str(d / "adapter_model.safetensors"))
    refuse(llm, d, r"was it trained for another model\?")


def test_corrupt_safetensors(llm, tiny_models, tmp_path):
    d = copy_adapter(tiny_models["llama"].adapters["r1_qv"], tmp_path / "corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    refuse(llm, d, "corrupt or not safetensors")


def test_same_name_different_path_in_generate(llm, tiny_models):
    tm = tiny_models["llama"]
    sp = SamplingParams(max_tokens=2, temperature=0)
    llm.generate([[5, 6, 7]], sp, LoRARequest("x", 1, str(tm.adapters["r1_qv"])), use_tqdm=False)
    with pytest.raises(ValueError, match="is loaded from"):
        llm.generate([[5, 6, 7]], sp, LoRARequest("x", 2, str(tm.adapters["r8_all"])), use_tqdm=False)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported; loramux runs LlamaForCausalLM, MistralForCausalLM"):
        LLM(str(tmp_path), device="cpu")


def test_bin_model_weights_are_refused(tiny_models, tmp_path):
    d = tmp_path / "binmodel"
    shutil.copytree(tiny_models["llama"].path, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only \.bin/\.pt weights; loramux reads safetensors"):
        LLM(str(d), device="cpu")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        LLM(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            (SamplingParams(max_tokens=1), True),
            {},
            "lora_request takes a LoRARequest .* not bool; pass use_tqdm",
        ),
        (({"max_tokens": 1},), {}, "sampling_params takes a SamplingParams or a list of them, not dict"),
        ((SamplingParams(max_tokens=1),), {"lora_request": ["r1_qv"]}, "lora_request takes a LoRARequest"),
    ],
)
def test_generate_arguments_of_the_wrong_type_are_named(llm, args, kwargs, match):
    """vLLM's older positional `generate(prompts, params, use_tqdm)` put True where loramux reads
    lora_request; that was an AttributeError deep inside. Now a TypeError names the argument, and
    nothing was queued."""
    with pytest.raises(TypeError, match=match):
        llm.generate(["hello"], *args, use_tqdm=False, **kwargs)
    assert not llm.engine.has_unfinished_requests()


def test_prompt_dict_keys_loramux_does_not_take_are_named(llm):
    """vLLM's prompt dicts may carry images (multi_modal_data); loramux serves text, so such a
    key is a ValueError naming it, not dropped while the text alone is answered."""
    image = {"prompt": "describe", "multi_modal_data": {"image": object()}}
    with pytest.raises(ValueError, match="holds 'multi_modal_data', which loramux does not take"):
        llm.generate([image], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
