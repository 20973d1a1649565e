"""Adapters found by name: a request naming an adapter nobody loaded is served from the folder
of that name in an --allowed-lora-dirs folder, loaded on first use (vLLM's filesystem LoRA
resolver; the rule the Ray catalog follows too).

Boundary: a name in; the adapter registered through the engine's own load path (on the engine
thread, so two requests for one new adapter register it once), or an `APIError` naming why it
cannot be loaded. No FastAPI; the routes call `load` when the engine did not know a name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loramux.server.async_engine import AsyncEngine
from loramux.server.paths import find_adapter
from loramux.server.protocol import APIError
from loramux.server.server_config import ServerConfig

logger = logging.getLogger("loramux.server")


class AdapterResolver:
    def __init__(self, aengine: AsyncEngine, cfg: ServerConfig) -> None:
        self.aengine = aengine
        self.allowed = [Path(d).resolve() for d in cfg.allowed_lora_dirs] if cfg.resolve_adapters else []

    def find(self, name: str) -> Path | None:
        """The allowed folder that serves `name` once it is asked for, if any (APIError 403 if it
        resolves outside the allowed folders)."""
        return find_adapter(name, self.allowed)

    async def load(self, name: str) -> bool:
        """Register `name` from its allowed folder; False if no allowed folder has it (the caller's
        404 stands). APIError 400 if the folder holds no adapter this engine can serve, 403 if it
        resolves outside the allowed folders."""
        path = self.find(name)
        if path is None:
            return False
        engine = self.aengine.engine

        def register() -> bool:  # on the engine thread
            if engine.has_lora(name):
                return False  # another request for it loaded it meanwhile
            engine.add_lora(name, str(path))
            return True

        try:
            if await self.aengine.call(register):
                logger.info("adapter %s: loaded on first use from %s", name, path)
        except ValueError as e:
            raise APIError(400, f"cannot load adapter {name!r} from {path}: {e}", param="model") from e
        return True
