"""Triton kernels for the CUDA path (paged attention, multi-LoRA shrink and expand).

Boundary: pure functions over tensors, no engine state. The torch code in
executor/attention.py and executor/lora.py is their reference; tests run these
kernels with Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""

import os

# Triton 3.9's interpreter gets bfloat16 tl.dot wrong (numpy has no bfloat16): interpreted, bf16
# dots run in float32; compiled, they run in bf16 on the tensor cores.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device_type: str) -> bool:
    """LORAMUX_KERNELS: "auto" (default: Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    choice = os.environ.get("LORAMUX_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"LORAMUX_KERNELS={choice!r}: use auto, triton or torch")
    if choice == "triton" and device_type != "cuda" and not INTERPRETED:
        raise ValueError("LORAMUX_KERNELS=triton off CUDA needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return choice == "triton" or (choice == "auto" and device_type == "cuda")
