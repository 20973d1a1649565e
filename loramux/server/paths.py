"""Where runtime adapter loads may read from: the allowed-folder check, and an adapter found by
name in an allowed folder.

Boundary: paths in, a resolved path or an `APIError` (403/400, OpenAI's shape)
out; no FastAPI and no engine, so the API (runtime loads and adapters found by
name) and the Ray catalog share one rule.
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


def find_adapter(name: str, allowed: list[Path]) -> Path | None:
    """The adapter folder `DIR/name` of the first allowed folder DIR that has one (an
    adapter_config.json inside), resolved; None if none has. `name` must be one plain path
    component; a folder that resolves outside DIR (a symlink) is APIError 403."""
    plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    for d in allowed if plain else []:
        try:
            found = (d / name / "adapter_config.json").is_file()
        except OSError:  # a name too long for the file system, ...: no such folder
            found = False
        if found:
            return allowed_path(str(d / name), allowed)
    return None
