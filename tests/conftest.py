"""Session fixtures: tiny offline models and adapters (no network, nothing downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.path.exists("/dev/nvidiactl"):  # no GPU: Triton kernels run in Triton's interpreter (issue 23)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from tests.hf_factory import corpus, train_tokenizer

    return train_tokenizer(corpus())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """arch -> TinyModel, each with four PEFT adapters."""
    from tests.hf_factory import build_model

    root = tmp_path_factory.mktemp("models")
    archs = ("llama", "mistral", "qwen2")
    return {arch: build_model(arch, root, tokenizer, seed=i) for i, arch in enumerate(archs)}


@pytest.fixture(scope="session")
def oracles(tiny_models):
    from tests.hf_factory import PeftOracle

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = PeftOracle(tiny_models[arch])
        return cache[arch]

    return get
