"""Listening TCP sockets of processes, from /proc (Linux): which addresses a process tree listens on."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def _table(path: str, family: int):
    sockets = {}
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return sockets
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state != LISTEN:
            continue
        address, port = local.split(":")
        raw = bytes.fromhex(address)
        if family == 4:
            ip = ipaddress.IPv4Address(raw[::-1])
        else:  # /proc stores IPv6 as four little-endian 32-bit words
            ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            ip = ip.ipv4_mapped or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        sockets[inode] = (str(ip), int(port, 16))
    return sockets


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    tables = {**_table("/proc/net/tcp", 4), **_table("/proc/net/tcp6", 6)}
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in tables:
                found.append((pid, *tables[link[8:-1]]))
    return found
