"""LoRARequest: which adapter a prompt runs under, as in vLLM.

Boundary: plain data. The engine loads the adapter on first use and keeps it
registered under `lora_name`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    """The adapter's name: what the API's `model` field says."""
    lora_int_id: int
    """A positive id, as vLLM takes it; loramux keys adapters by name and keeps it for reference."""
    lora_path: str
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    load_inplace: bool = False
    """vLLM's: (re)load the adapter from lora_path even if one is loaded under lora_name, in its
    place (a trainer's new weights each step); requests already queued finish on the old ones."""

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be non-empty")
        if self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id}; it must be >= 1")
