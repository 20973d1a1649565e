"""loramux on Ray Serve (`pip install 'loramux[ray]'`): one endpoint, many engines, adapter-aware routing.

Boundary: the public face of the scale-out; `deployment` holds the Ray Serve
wiring, `catalog` the adapter names, `asgi` the in-process HTTP call. Ray is
imported on first use of a name below, not by `catalog` or `asgi`.

    loramux serve MODEL --lora-modules a=/p/a b=/p/b --replicas 2

or, in Python, `serve.run(loramux.ray.build_app(args))` with `args` parsed by
`loramux.server.serve_args.add_serve_args`. See docs/scale-out.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APP_NAME", "REPLICA_HEADER", "app_builder", "build_app", "run_cluster"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from loramux.ray import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'loramux.ray' has no attribute {name!r}")
