"""A private network namespace for tests that need fixed ports (tvix-store's 8000) or a host without IPv6.

``NetNs`` holds a namespace open with a sleeping ``unshare -n`` process
(only ``lo``, brought up; IPv6 switched off when asked); ``wrap(argv)``
runs a command inside it (``nsenter``), and ``listening()`` reads the
namespace's listening TCP sockets from that process's /proc. Nothing any
other test or engineer listens on can collide with it. Needs root.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess

MISSING = None if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter") \
    and shutil.which("ip") else "needs root, unshare, nsenter and ip"


class NetNs:
    def __init__(self, ipv6: bool = True) -> None:
        v6 = "" if ipv6 else ("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 && "
                              "sysctl -qw net.ipv6.conf.lo.disable_ipv6=1 && ")
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", f"{v6}ip link set lo up && echo up && exec sleep 3600"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "up":
            self.close()
            raise RuntimeError("could not set up a network namespace")

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-n", *argv]

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every listening TCP socket in the namespace (v4-mapped shown as IPv4)."""
        out = set()
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{self.proc.pid}/net/{table}") as f:
                    lines = f.read().splitlines()[1:]
            except FileNotFoundError:  # no IPv6 at all
                continue
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state != "0A":  # LISTEN
                    continue
                host, port = local.split(":")
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word byte order
                address = ipaddress.ip_address(raw)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                out.add((str(address), int(port, 16)))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
