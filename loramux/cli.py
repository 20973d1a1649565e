"""Command line: `loramux serve`, `loramux bench` and `loramux simulate`.

Boundary: parses flags and hands them on. The flags of `serve` and how they
become `EngineConfig` and `ServerConfig` (S6.2) are in loramux/server/serve_args.py,
the server it runs in loramux/server/builder.py (a Ray replica builds the same).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from loramux import __version__
from loramux.server.builder import build_server
from loramux.server.serve_args import add_serve_args
from loramux.server.vllm_argv import expand_serve_argv
from loramux.server.vllm_flags import apply_vllm_args, apply_vllm_resolver_env

logger = logging.getLogger("loramux")


def serve(args: argparse.Namespace) -> None:
    apply_vllm_args(args)  # vLLM's flags: mapped, ignored with a log line, or refused naming the fix
    apply_vllm_resolver_env(args)  # vLLM's filesystem LoRA resolver: one more --allowed-lora-dirs
    if args.replicas is not None:
        from loramux.ray import run_cluster

        run_cluster(args)
        return
    import uvicorn

    built = build_server(args)
    rt = built.aengine.engine.runtime
    scheme = "https" if args.ssl_certfile else "http"
    where = f"unix socket {args.uds}" if args.uds else f"{scheme}://{args.host}:{args.port}{args.root_path}"
    logger.info(
        "serving %s (%s, %s) with %d adapters on %s: %d KV pages of %d tokens, max_model_len %d",
        built.name,
        rt.device,
        rt.dtype,
        len(built.loras),
        where,
        rt.num_pages,
        args.page_size,
        rt.max_model_len,
    )
    # SIGTERM: uvicorn stops accepting, lets running requests finish for up to --shutdown-timeout,
    # then cancels them (their requests are aborted) and re-raises the signal to the handler that
    # was there before it: this one, so the process ends normally, with exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: logger.info("stopped on SIGTERM"))
    try:
        uvicorn.run(
            built.app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=args.shutdown_timeout,
            uds=args.uds,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers or "TLSv1",
            log_config=getattr(args, "log_config", None) or uvicorn.config.LOGGING_CONFIG,
        )
    finally:
        built.aengine.shutdown()


def _log_config(path: str) -> dict:
    """Apply a logging dictConfig file (JSON) and return it, for uvicorn to apply too."""
    import json
    import logging.config

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        logging.config.dictConfig(config)
        return config
    except (OSError, ValueError, TypeError, AttributeError) as e:
        print(f"loramux: error: --log-config-file {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Serve one base model with many LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        formatter_class=HelpFormatter,
    )
    add_serve_args(serve_parser)
    bench = sub.add_parser("bench", help="throughput and latency, side by side with transformers+PEFT")
    from loramux.bench.cli import add_bench_args

    add_bench_args(bench)
    simulate = sub.add_parser(
        "simulate",
        help="the real scheduler on a virtual clock: policies, rates and workloads, in seconds",
        formatter_class=HelpFormatter,
    )
    from loramux.sim.cli import add_simulate_args

    add_simulate_args(simulate)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # vLLM's dialect: --config FILE.yaml, --flag_name
        try:
            argv = ["serve", *expand_serve_argv(argv[1:], serve_parser._option_string_actions)]
        except ValueError as e:
            serve_parser.error(str(e))
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    log_config = getattr(args, "log_config_file", None)
    if log_config:  # vLLM's --log-config-file: one dictConfig (JSON) for loramux's and uvicorn's logs
        args.log_config = _log_config(log_config)
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            serve(args)
        elif args.command == "simulate":
            from loramux.sim.cli import run_simulate

            run_simulate(args)
        else:
            from loramux.bench.cli import run_bench

            run_bench(args)
    except ValueError as e:  # configuration errors: say what and how to fix it, no traceback
        print(f"loramux: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
