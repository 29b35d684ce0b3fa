"""``python -m service serve [--config FILE] [--host H] [--port P] [--database URL] [--workers N] [--auth none|jwt]``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from service.config import Config, add_arguments, load_config
from service.errors import ServiceError
from service.queue import safe_url

log = logging.getLogger("service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description="A durable chat backend for AutoGen agent teams."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve HTTP, WebSocket and SSE, and run the worker pool",
        description="Settings come from the command line, then SERVICE_* environment variables, then config.toml.",
    )
    add_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        config = load_config(cli=args, config_file=args.get("config"))
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except ServiceError as exc:
        log.error("cannot start: %s", exc.message)
        return 2
    except OSError as exc:  # the address is taken, or not ours to bind
        log.error("cannot listen on %s port %s: %s", config.host, config.port, exc.strerror or exc)
        return 2
    return 0


async def serve(config: Config) -> None:
    from service import tracing
    from service.app import create_app  # imports AutoGen: keep `--help` fast

    provider = tracing.setup()  # README "Tracing": only when the OTEL_* environment asks for it
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=config.grace_s + 5)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        for address in runner.addresses:  # the real port when --port 0
            host, port = address[:2]
            host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
            log.info(
                "listening on http://%s:%s (database %s, auth %s)",
                host,
                port,
                safe_url(config.database),
                config.auth,
            )
        await stop.wait()
        log.info("shutting down: no new inputs; runs get %.0f s to finish", config.grace_s)
    finally:
        await runner.cleanup()
        if provider is not None:
            await asyncio.to_thread(
                provider.shutdown
            )  # exports the spans still buffered (bounded by OTLP timeouts)
        log.info("stopped")
    await _leave_abandoned_runs()


async def _leave_abandoned_runs() -> None:
    """Runs AutoGen did not end when asked were abandoned (README "Guarantees"); their outcome is already in
    the store. ``asyncio.run`` would wait for them (and for their tool threads) forever on the way out: give
    them a moment, then exit without them."""
    from service.worker import runner

    if runner.ABANDONED:
        await asyncio.wait(set(runner.ABANDONED), timeout=1.0)
    if runner.abandoned_total:
        # Even when their tasks ended, a synchronous tool of an abandoned team may still run in a thread, which
        # asyncio.run would wait for on the way out (it joins the default executor).
        log.warning("exiting without waiting for the tools of %d abandoned run(s)", runner.abandoned_total)
        logging.shutdown()
        os._exit(0)
