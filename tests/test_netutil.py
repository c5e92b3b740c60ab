"""is_loopback: the one check behind `serve --host` (needs --api-key) and `worker --host` (needs --expose)."""

import socket

import pytest

from qwq_local.netutil import is_loopback


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.1.1", "::1"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "2001:db8::1", "no-such-host.invalid", ""])
def test_other_hosts(host):
    assert not is_loopback(host)


def test_a_name_is_resolved():
    # Not the "localhost" shortcut: the resolver's answer for another spelling of it decides.
    assert {info[4][0] for info in socket.getaddrinfo("LOCALHOST", None)} <= {"127.0.0.1", "::1"}
    assert is_loopback("LOCALHOST")
