"""Where runtime adapter loads may read from: the allowed-folder check.

Boundary: paths in, a resolved path or an `APIError` (403/400, OpenAI's shape)
out; no FastAPI and no engine, so the API (runtime loads) and the Ray catalog
(adapters found by name) share one rule.
"""

from __future__ import annotations

from pathlib import Path

from loramux.server.protocol import APIError


def allowed_path(raw: str, allowed: list[Path]) -> Path:
    """`raw` resolved (symlinks and '..' followed); APIError 403 unless it lies in an allowed folder."""
    if not allowed:
        raise APIError(
            403,
            "runtime adapter loading is off; start the server with --allowed-lora-dirs DIR",
            type_="permission_error",
            param="lora_path",
        )
    try:
        path = Path(raw).resolve()  # follows symlinks and '..'
    except (ValueError, OSError) as e:  # a NUL byte, a symlink loop, ...
        raise APIError(400, f"lora_path {raw!r} is not a usable path: {e}", param="lora_path") from e
    if not any(path.is_relative_to(d) for d in allowed):
        raise APIError(
            403,
            f"lora_path {raw!r} is outside the allowed adapter folders",
            type_="permission_error",
            param="lora_path",
        )
    return path
