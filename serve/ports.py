"""Where serve listens: addresses, and the check that every port the user named is free before
tritonserver starts (its own start takes seconds; a clash found after it is a clash found late).

Ports are checked with ``SO_REUSEADDR``, as tritonserver and the supervisor's endpoint bind them,
so a stopped server's TIME_WAIT connections do not block a restart on the same ports.
"""

from __future__ import annotations

import errno
import socket

from filterserve.errors import FilterServeError
from filterserve.serve.options import PORT_FLAGS, ServeOptions


def connect_host(host: str) -> str:
    """Where a local client reaches a server listening on ``host`` (every interface → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def cannot_listen(host: str, port: int, what: str, error: OSError) -> FilterServeError:
    """One line naming the port and the flag that set it."""
    flag = PORT_FLAGS[what]
    if error.errno == errno.EADDRINUSE:
        return FilterServeError(f"{flag} {port} is already in use on {host}: stop what listens there, or pick another port "
                                "(0: a free one)")
    return FilterServeError(f"cannot listen on {address(host, port)} ({flag}, --host): {error.strerror or error}")


def check_ports(options: ServeOptions) -> None:
    """Refuse a named port that something already listens on; ports of 0 are picked free later."""
    for what, port in options.ports().items():
        if not port:
            continue
        with socket.socket(address_family(options.host), socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((options.host, port))
            except OSError as exc:
                raise cannot_listen(options.host, port, what, exc) from None
