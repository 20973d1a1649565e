"""The control plane imports no torch (style rule 1; issue: control plane)."""

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import loramux.core, loramux.core.scheduler, loramux.core.policies, loramux.core.prefix_cache
import loramux.core.adapters, loramux.core.kv_manager, loramux.config, loramux.executor.fake
import loramux.sampling_params, loramux.lora_request
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""


def test_control_plane_imports_with_torch_blocked():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_blocking_works():
    """Negative control: with torch blocked, importing it must fail."""
    proc = subprocess.run(
        [sys.executable, "-c", 'import sys; sys.modules["torch"] = None; import torch'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr
