"""``python -m personalization_pipeline.ingest_service --host 127.0.0.1 --port 8710``.

Configuration comes from the environment (see ``IngestConfig.from_env``). Start-up
problems (a missing variable, a port in use, an unwritable landing dir) print one line
and exit with status 2. SIGINT/SIGTERM stop gracefully: in-flight requests finish and the
open landing file is published.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from .app import IngestServiceHandle, bind_socket, create_app, start_ingest_service
from .config import ConfigError, IngestConfig

__all__ = ["main", "start_ingest_service", "IngestServiceHandle"]

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"ingest: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personalization_pipeline.ingest_service",
        description="Webhook ingest service: lands track, Shopify and Mailchimp events durably.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8710)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    try:
        config = IngestConfig.from_env()
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")

    try:
        for sub in ("open", "ready"):
            os.makedirs(config.landing_dir / sub, exist_ok=True)
        if not os.access(config.landing_dir / "open", os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as exc:
        return _fail(f"landing dir {config.landing_dir} is not writable: {exc.strerror or exc}")

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(f"cannot listen on {args.host}:{args.port}: address already in use")
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")

    import uvicorn

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level=args.log_level,
            access_log=False,  # ours redacts the Mailchimp secret; uvicorn's would not
            lifespan="on",
            server_header=False,
            proxy_headers=False,  # nothing here reads the client address
            timeout_graceful_shutdown=10,
        )
    )
    logging.getLogger(__name__).info(
        "ingest service listening on http://%s:%d, landing dir %s",
        args.host, sock.getsockname()[1], config.landing_dir,
    )
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown, which publishes the open
    # landing file), then re-raises the signal into the handlers it found: make those
    # no-ops so that a requested stop exits 0 instead of dying by the signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
