"""Loopback ports: a clear error for a busy one, and free ones for tests and benchmarks."""

from __future__ import annotations

import socket


class PortInUse(Exception):
    pass


def check_port_free(port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise PortInUse(
                f"port {port} on 127.0.0.1 is already in use (is another demo running?). "
                f"Stop what uses it or pick another port with {flag} PORT."
            ) from None


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct ports that were free a moment ago (held together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
