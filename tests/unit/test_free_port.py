"""Ports for a mesh's services: distinct within a process, and outside the kernel's
ephemeral range (which outgoing connections draw from)."""

from __future__ import annotations

import socket
from pathlib import Path

from clawdbot.runner.__main__ import free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert all(1024 <= port < low for port in picked)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked[-1]))  # nothing took it
