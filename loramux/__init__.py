"""loramux: serve one base model with many LoRA adapters.

The public names (`LLM`, `SamplingParams`, `LoRARequest`) are imported lazily so
that `import loramux.core` (the torch-free control plane) never pulls in torch.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]

if TYPE_CHECKING:
    from loramux.engine.llm import LLM
    from loramux.engine.outputs import RequestOutput
    from loramux.lora_request import LoRARequest
    from loramux.sampling_params import SamplingParams, StructuredOutputsParams

_LAZY = {
    "LLM": "loramux.engine.llm",
    "RequestOutput": "loramux.engine.outputs",
    "LoRARequest": "loramux.lora_request",
    "SamplingParams": "loramux.sampling_params",
    "StructuredOutputsParams": "loramux.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loramux' has no attribute {name!r}")
