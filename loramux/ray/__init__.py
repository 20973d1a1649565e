"""loramux on Ray Serve (`pip install 'loramux[ray]'`): one endpoint, many engines, adapter-aware routing.

Boundary: the public face of the scale-out; `deployment` holds the Ray Serve
wiring, `catalog` the adapter names, `asgi` the in-process HTTP call. Ray is
imported only when this package is.

    loramux serve MODEL --lora-modules a=/p/a b=/p/b --replicas 2

or, in Python, `serve.run(loramux.ray.build_app(args))` with `args` parsed by
`loramux.cli.add_serve_args`. See docs/scale-out.md.
"""

from __future__ import annotations

from loramux.ray.deployment import APP_NAME, REPLICA_HEADER, build_app, run_cluster

__all__ = ["APP_NAME", "REPLICA_HEADER", "build_app", "run_cluster"]
