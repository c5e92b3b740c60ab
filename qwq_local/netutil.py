"""Network checks shared by the server (`serve --host`) and the RPC worker (`worker --host`)."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """True when binding `host` keeps a port on this machine: "localhost", a loopback address
    (127.0.0.0/8, ::1), or a name every address of which is one (Debian maps the machine's own
    name to 127.0.1.1). False for wildcard and other addresses and for names that do not resolve."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
