"""Start-up work off the path to the first answer (issue 15, point 2).

Serving imports neither peft nor transformers' model or config classes nor torch._dynamo; a
config.json that states every key is read as plain JSON and gives the model exactly what
transformers' AutoConfig gives; anything else still goes through AutoConfig.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from loramux.executor.loader import load_hf_config
from loramux.executor.models.llama import LlamaArgs

HEAVY = (
    "peft",
    "torch._dynamo",
    "transformers.utils.type_validators",
    "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama",
)


def test_an_engine_with_an_adapter_imports_none_of_the_heavy_modules(tiny_models):
    tm = tiny_models["llama"]
    adapter = next(iter(tm.adapters.values()))
    code = f"""
import sys
from loramux import LLM, LoRARequest, SamplingParams
llm = LLM({str(tm.path)!r}, device="cpu")
lora = LoRARequest("a", 1, {str(adapter)!r})
out = llm.generate(["hello"], SamplingParams(max_tokens=2), lora, use_tqdm=False)
assert out[0].outputs[0].token_ids
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_plain_config_gives_the_model_what_autoconfig_gives(tiny_models, arch):
    from transformers import AutoConfig

    path = tiny_models[arch].path
    plain, name = load_hf_config(path)
    assert type(plain).__name__ == "SimpleNamespace"  # read without transformers
    auto = AutoConfig.from_pretrained(str(path), local_files_only=True)
    assert LlamaArgs.from_hf(plain, name) == LlamaArgs.from_hf(auto, name)


def test_an_incomplete_config_goes_through_autoconfig(tiny_models, tmp_path):
    src = tiny_models["llama"].path
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["rms_norm_eps"]  # transformers knows the default; plain JSON does not
    (dst / "config.json").write_text(json.dumps(cfg))
    got, name = load_hf_config(dst)
    assert type(got).__name__ != "SimpleNamespace" and got.rms_norm_eps > 0 and name == "LlamaForCausalLM"


def test_a_config_that_is_not_an_object_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_hf_config(tmp_path)
