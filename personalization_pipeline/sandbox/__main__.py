"""Run the sandbox in the foreground:

    python -m personalization_pipeline.sandbox --hubspot-port 8701 --mailchimp-port 8702 \
        --shop-port 8703 --alerts-port 8704 --seed 7 --size 2000 --edits-per-minute 30

Prints the URLs, runs until SIGINT or SIGTERM. A port in use: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from personalization_pipeline.sandbox.server import PortInUseError, SandboxConfig, start_sandbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personalization_pipeline.sandbox",
                                     description="HubSpot, Mailchimp, shop and alert-sink sandboxes on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--hubspot-port", type=int, default=8701)
    parser.add_argument("--mailchimp-port", type=int, default=8702)
    parser.add_argument("--shop-port", type=int, default=8703)
    parser.add_argument("--alerts-port", type=int, default=8704)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", type=int, default=2000, help="synthetic people")
    parser.add_argument("--history-days", type=float, default=30)
    parser.add_argument("--edits-per-minute", type=float, default=0, help="background CRM and ESP edits")
    parser.add_argument("--token-ttl-seconds", type=float, default=1800)
    parser.add_argument("--hubspot-requests-per-10s", type=int, default=100)
    parser.add_argument("--hubspot-search-per-second", type=int, default=4)
    parser.add_argument("--hubspot-search-max-results", type=int, default=10_000)
    parser.add_argument("--mailchimp-max-connections", type=int, default=10)
    args = parser.parse_args(argv)

    config = SandboxConfig(
        seed=args.seed,
        size=args.size,
        history_days=args.history_days,
        edits_per_minute=args.edits_per_minute,
        token_ttl_seconds=args.token_ttl_seconds,
        hubspot_requests_per_10s=args.hubspot_requests_per_10s,
        hubspot_search_per_second=args.hubspot_search_per_second,
        hubspot_search_max_results=args.hubspot_search_max_results,
        mailchimp_max_connections=args.mailchimp_max_connections,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ports = {"hubspot": args.hubspot_port, "mailchimp": args.mailchimp_port,
             "shop": args.shop_port, "alerts": args.alerts_port}
    try:
        sandbox = start_sandbox(config, host=args.host, ports=ports)
    except PortInUseError as exc:
        print(f"sandbox: {exc}; stop whatever holds it or choose another port with --{exc.app}-port",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"sandbox running (seed {config.seed}, {config.size} people, "
              f"{config.edits_per_minute:g} edits/min); Ctrl-C to stop", flush=True)
        for app, url in sandbox.urls.items():
            print(f"  {app:<10} {url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    print("sandbox stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
