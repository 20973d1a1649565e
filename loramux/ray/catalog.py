"""Which adapters a cluster serves and where their files are.

Boundary: names to paths, no Ray and no engine. On Ray Serve an adapter is
not loaded ahead of time on every replica: the router sends a request to a
replica that holds its adapter, and a replica that does not loads it on demand
through the engine's own load path. So every replica (and the router) must be
able to find an adapter by name alone. Two sources, as `loramux serve` has:

- `--lora-modules NAME=PATH`: the operator's own list;
- `--allowed-lora-dirs DIR ...`: an adapter folder `DIR/NAME` (Ray Serve LLM's
  dynamic LoRA loading path). The name must be one plain path component and the
  folder must resolve inside DIR (symlinks and '..' followed), the same rule
  runtime loads follow in `loramux serve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loramux.server.paths import find_adapter
from loramux.server.protocol import APIError


@dataclass(frozen=True)
class Catalog:
    base: str  # the base model's `model` id
    modules: dict[str, str]  # --lora-modules
    allowed: tuple[Path, ...]  # --allowed-lora-dirs, resolved
    aliases: tuple[str, ...] = ()  # the base model's other ids (--served-model-name's further names)

    @classmethod
    def create(
        cls,
        base: str,
        modules: list[tuple[str, str]],
        allowed_dirs: list[str],
        aliases: tuple[str, ...] = (),
    ) -> Catalog:
        return cls(base, dict(modules), tuple(Path(d).resolve() for d in allowed_dirs), aliases)

    def is_base(self, name: str) -> bool:
        return name == self.base or name in self.aliases

    def path(self, name: str) -> str:
        """The adapter folder of `name`; APIError 404 (unknown) or 403 (outside the folders)."""
        if name in self.modules:
            return self.modules[name]
        found = find_adapter(name, list(self.allowed))
        if found is not None:
            return str(found)
        raise APIError(
            404,
            f"the model {name!r} does not exist: it is neither the base model ({self.base!r}), nor named "
            f"by --lora-modules, nor an adapter folder in --allowed-lora-dirs",
            code="model_not_found",
            param="model",
        )

    def names(self) -> list[str]:
        """Every adapter the cluster can serve now (module names, then the allowed folders')."""
        found = dict.fromkeys(self.modules)
        for d in self.allowed:
            if d.is_dir():
                for sub in sorted(d.iterdir()):
                    if (sub / "adapter_config.json").is_file() and sub.resolve().is_relative_to(d):
                        found.setdefault(sub.name)
        return list(found)
