"""Start the four sandbox servers (HubSpot, Mailchimp, shop, alert sink) on loopback.

    with start_sandbox(SandboxConfig(size=2000)) as sandbox:
        requests.get(f"{sandbox.mailchimp_url}/3.0/ping", headers=...)

Each app is served by its own uvicorn server in a background thread. Ports are bound
before anything else happens, so a port already in use fails fast with `PortInUseError`.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import uvicorn

from personalization_pipeline.sandbox.alerts import AlertSink, build_alerts_app
from personalization_pipeline.sandbox.data import World, generate_world
from personalization_pipeline.sandbox.faults import BuiltApp
from personalization_pipeline.sandbox.hubspot import HubSpotAuth, HubSpotState, build_hubspot_app
from personalization_pipeline.sandbox.mailchimp import MailchimpAuth, MailchimpState, build_mailchimp_app
from personalization_pipeline.sandbox.shop import build_shop_app

APPS = ("hubspot", "mailchimp", "shop", "alerts")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SandboxConfig:
    """Everything the sandbox can be told. Limits default to VENDOR-APIS.md."""

    seed: int = 7
    size: int = 2000
    history_days: float = 30
    token_ttl_seconds: float = 1800
    hubspot_requests_per_10s: int = 100
    hubspot_search_per_second: int = 4
    hubspot_search_max_results: int = 10_000
    mailchimp_max_connections: int = 10
    edits_per_minute: float = 0
    hubspot_client_id: str = "sandbox-hubspot-client"
    hubspot_client_secret: str = "sandbox-hubspot-secret"
    hubspot_refresh_token: str = "sandbox-hubspot-refresh"
    hubspot_private_app_token: str = "sandbox-hubspot-private-app"
    mailchimp_client_id: str = "sandbox-mailchimp-client"
    mailchimp_client_secret: str = "sandbox-mailchimp-secret"
    mailchimp_access_token: str = "sandbox-mailchimp-token"
    mailchimp_api_key: str = "0123456789abcdef0123456789abcdef-us1"
    mailchimp_list_id: str = "5f1a3c9e2b"
    mailchimp_dc: str = "us1"
    clock: Callable[[], datetime] = utc_now
    world_now: datetime | None = None
    """The instant the world is generated at; default: `clock()` at start."""
    churn_poll_seconds: float = 0.25


class PortInUseError(OSError):
    """A sandbox port is taken; the message names the app, host and port."""

    def __init__(self, app: str, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"{app} port {port} on {host} is already in use")
        self.app, self.host, self.port = app, host, port

    def __str__(self) -> str:
        return f"{self.app} port {self.port} on {self.host} is already in use"


class Churn:
    """Keeps editing contacts and members: `edits_per_minute` of each, paced by the
    sandbox clock (so a test's fake clock drives it); `tick()` applies what is due."""

    MAX_PER_TICK = 10_000

    def __init__(self, hubspot: HubSpotState, mailchimp: MailchimpState, edits_per_minute: float,
                 clock: Callable[[], datetime]) -> None:
        self.hubspot, self.mailchimp = hubspot, mailchimp
        self.edits_per_minute = edits_per_minute
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            elapsed = max(0.0, (self.clock() - self.started).total_seconds())
            target = int(elapsed * self.edits_per_minute / 60)
            due = min(target - self.done, self.MAX_PER_TICK)
            if due <= 0:
                return 0
            self.hubspot.mutate(due)
            self.mailchimp.mutate(due)
            # Counted once applied, so `done` never runs ahead of what a reader can see.
            self.done = max(self.done, target)
        return due

    def start(self, poll_seconds: float) -> None:
        def run() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - a churn hiccup must not kill the sandbox
                    pass

        self._thread = threading.Thread(target=run, name="sandbox-churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


@dataclass(repr=False)
class Sandbox:
    """A running sandbox. Stop it with `stop()` or use it as a context manager."""

    config: SandboxConfig
    host: str
    world: World
    hubspot_state: HubSpotState
    hubspot_auth: HubSpotAuth
    mailchimp_state: MailchimpState
    mailchimp_auth: MailchimpAuth
    alert_sink: AlertSink
    apps: dict[str, BuiltApp]
    ports: dict[str, int]
    churn: Churn | None = None
    _servers: dict[str, uvicorn.Server] = field(default_factory=dict)
    _threads: dict[str, threading.Thread] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Sandbox(size={self.config.size}, seed={self.config.seed}, urls={self.urls})"

    def url(self, app: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.ports[app]}"

    @property
    def hubspot_url(self) -> str:
        return self.url("hubspot")

    @property
    def mailchimp_url(self) -> str:
        return self.url("mailchimp")

    @property
    def shop_url(self) -> str:
        return self.url("shop")

    @property
    def alerts_url(self) -> str:
        return self.url("alerts")

    @property
    def urls(self) -> dict[str, str]:
        return {app: self.url(app) for app in APPS}

    def reset(self) -> None:
        """Back to the generated world: data, pushes, alerts, faults (tokens stay valid)."""
        self.hubspot_state.reset()
        self.mailchimp_state.reset()
        self.alert_sink.clear()
        for app in self.apps.values():
            app.faults.clear()

    def stop(self) -> None:
        if self.churn is not None:
            self.churn.stop()
        for server in self._servers.values():
            server.should_exit = True
        deadline = time.monotonic() + 3
        for name, thread in self._threads.items():
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                self._servers[name].force_exit = True
                thread.join(timeout=2)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(app: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(app, host, port) from None
        raise OSError(exc.errno, f"cannot listen on {host}:{port} for {app}: {exc.strerror}") from None
    return sock


def start_sandbox(config: SandboxConfig | None = None, host: str = "127.0.0.1",
                  ports: dict[str, int] | None = None) -> Sandbox:
    """Generate the world and serve the four apps; `ports` maps app name -> port (0 or
    missing = any free port). Raises PortInUseError naming the port that is taken."""
    config = config or SandboxConfig()
    ports = dict(ports or {})
    unknown = set(ports) - set(APPS)
    if unknown:
        raise ValueError(f"unknown app(s) in ports: {', '.join(sorted(unknown))}; use {', '.join(APPS)}")
    sockets: dict[str, socket.socket] = {}
    try:
        for app in APPS:
            sockets[app] = _bind(app, host, int(ports.get(app, 0)))
    except OSError:
        for sock in sockets.values():
            sock.close()
        raise
    try:
        world = generate_world(config.seed, config.size, config.world_now or config.clock(), config.history_days)
        hubspot_state = HubSpotState(world, config.clock, search_max_results=config.hubspot_search_max_results)
        hubspot_auth = HubSpotAuth(
            client_id=config.hubspot_client_id,
            client_secret=config.hubspot_client_secret,
            refresh_token=config.hubspot_refresh_token,
            private_app_token=config.hubspot_private_app_token,
            token_ttl_seconds=config.token_ttl_seconds,
        )
        mailchimp_state = MailchimpState(world, config.clock, list_id=config.mailchimp_list_id)
        mailchimp_auth = MailchimpAuth(
            client_id=config.mailchimp_client_id,
            client_secret=config.mailchimp_client_secret,
            access_token=config.mailchimp_access_token,
            api_key=config.mailchimp_api_key,
        )
        sink = AlertSink()
        apps = {
            "hubspot": build_hubspot_app(
                hubspot_state, hubspot_auth,
                requests_per_10s=config.hubspot_requests_per_10s,
                search_per_second=config.hubspot_search_per_second,
            ),
            "mailchimp": build_mailchimp_app(
                mailchimp_state, mailchimp_auth,
                max_connections=config.mailchimp_max_connections, dc=config.mailchimp_dc,
            ),
            "shop": build_shop_app(world),
            "alerts": build_alerts_app(sink),
        }
        sandbox = Sandbox(
            config=config, host=host, world=world,
            hubspot_state=hubspot_state, hubspot_auth=hubspot_auth,
            mailchimp_state=mailchimp_state, mailchimp_auth=mailchimp_auth,
            alert_sink=sink, apps=apps,
            ports={app: sock.getsockname()[1] for app, sock in sockets.items()},
        )
        for app, sock in sockets.items():
            server = uvicorn.Server(
                uvicorn.Config(
                    apps[app].asgi,
                    log_config=None,
                    log_level="warning",
                    access_log=False,
                    lifespan="off",
                    proxy_headers=False,
                    server_header=False,
                    timeout_graceful_shutdown=1,
                    timeout_keep_alive=30,
                )
            )
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"sandbox-{app}", daemon=True)
            sandbox._servers[app] = server
            sandbox._threads[app] = thread
            thread.start()
        deadline = time.monotonic() + 15
        while not all(s.started for s in sandbox._servers.values()):
            dead = [a for a, t in sandbox._threads.items() if not t.is_alive()]
            if dead or time.monotonic() > deadline:
                sandbox.stop()
                raise RuntimeError(f"sandbox server(s) failed to start: {', '.join(dead) or 'timed out'}")
            time.sleep(0.005)
    except BaseException:
        for sock in sockets.values():
            try:
                sock.close()
            except OSError:
                pass
        raise
    if config.edits_per_minute > 0:
        sandbox.churn = Churn(hubspot_state, mailchimp_state, config.edits_per_minute, config.clock)
        sandbox.churn.start(config.churn_poll_seconds)
    return sandbox
