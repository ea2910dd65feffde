"""A shaped network link between two network namespaces, for benches that must see a real link.

Two namespaces, ``lrgb-<pid>-s`` (far side: servers) and ``lrgb-<pid>-c`` (client), joined by a veth
pair 10.77.0.1/30 <-> 10.77.0.2/30 whose both ends are shaped by ``tc``: tbf at the given rate, and
a netem delay when the kernel has netem. Nothing is added to the root namespace except for the
instant the veth pair is created (then both ends move into the namespaces).

The owner's pid is in every name, so that a later run removes what a killed run left (and never
what a live run holds): ``remove_stale()``.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREFIX = "lrgb"
SERVER_ADDR, CLIENT_ADDR = "10.77.0.1", "10.77.0.2"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
CLONE_NEWNET = 0x40000000


def rate_bits(rate: str) -> int:
    """``1gbit`` / ``200mbit`` / ``800kbit`` in bits per second; ValueError for anything else."""
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: expected a number and kbit/mbit/gbit, e.g. 1gbit or 200mbit")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """This bench's namespaces that exist now (any owner)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")]


def root_links() -> list[str]:
    """This bench's network interfaces in the root namespace (there should never be any for long)."""
    out = _ip("-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]
    return [n for n in names if n.startswith(PREFIX)]


def _owner(name: str) -> int | None:
    m = re.match(rf"^{PREFIX}-?(\d+)", name)
    return int(m.group(1)) if m else None


def _remove_namespace(ns: str) -> None:
    # a namespace lives on while a process runs in it: end what still runs there (only processes of
    # this bench run in these namespaces), then drop the name
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        if int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "delete", ns, check=False)


def remove_stale() -> list[str]:
    """Remove namespaces and root-namespace veths left by runs whose process is gone; return their names."""
    removed = []
    for ns in namespaces():
        owner = _owner(ns)
        if owner is None or not _alive(owner):
            _remove_namespace(ns)
            removed.append(ns)
    for link in root_links():
        owner = _owner(link)
        if owner is None or not _alive(owner):
            _ip("link", "delete", link, check=False)
            removed.append(link)
    return removed


class ShapedLink:
    """The two namespaces and the shaped veth pair between them; ``down()`` removes everything."""

    def __init__(self, rate: str, delay_ms: float = 1.0) -> None:
        self.rate = rate
        self.bits = rate_bits(rate)
        self.delay_ms = delay_ms
        pid = os.getpid()
        self.server_ns, self.client_ns = f"{PREFIX}-{pid}-s", f"{PREFIX}-{pid}-c"
        self.server_dev, self.client_dev = f"{PREFIX}{pid}s", f"{PREFIX}{pid}c"
        self.delay_note = ""
        self._home_ns: int | None = None

    def up(self) -> None:
        _ip("netns", "add", self.server_ns)
        _ip("netns", "add", self.client_ns)
        _ip("link", "add", self.client_dev, "netns", self.client_ns, "type", "veth",
            "peer", "name", self.server_dev, "netns", self.server_ns)
        ends = ((self.server_ns, self.server_dev, SERVER_ADDR), (self.client_ns, self.client_dev, CLIENT_ADDR))
        for ns, dev, addr in ends:
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
            self._shape(ns, dev)

    def _shape(self, ns: str, dev: str) -> None:
        # tbf's bucket must hold a whole veth GSO packet (up to 64 KiB) and a few ms of the rate, or
        # it drops (or starves) what it should only pace
        burst = max(256 * 1024, self.bits // 8 // 250)
        tc = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
        subprocess.run([*tc, "root", "handle", "1:", "tbf", "rate", str(self.bits), "burst", str(burst),
                        "latency", "20ms"], check=True, capture_output=True, timeout=30)
        if self.delay_ms > 0:
            done = subprocess.run([*tc, "parent", "1:1", "handle", "10:", "netem", "delay", f"{self.delay_ms}ms",
                                   "limit", "100000"], capture_output=True, text=True, timeout=30)
            if done.returncode:
                # this kernel may be built without sch_netem: say so rather than fail
                self.delay_note = f"no added delay (netem: {done.stderr.strip()})"
            else:
                self.delay_note = f"+{self.delay_ms:g} ms each way (netem)"

    def down(self) -> None:
        self._leave_server_side()
        for ns in (self.client_ns, self.server_ns):
            _remove_namespace(ns)
        for dev in (self.client_dev, self.server_dev):
            if dev in root_links():
                _ip("link", "delete", dev, check=False)

    def client_cmd(self, *argv: str) -> list[str]:
        """``argv`` run in the client namespace."""
        return ["ip", "netns", "exec", self.client_ns, *argv]

    def enter_server_side(self) -> None:
        """Move this process's (only) thread into the server namespace: the servers it starts, its
        own sockets and the threads it starts from now on live there."""
        if self._home_ns is None:
            self._home_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.server_ns}", os.O_RDONLY)
        try:
            _setns(fd, self.server_ns)
        finally:
            os.close(fd)

    def _leave_server_side(self) -> None:
        # back home first: the `ip` commands that clean up must run in the namespace they started in
        if self._home_ns is not None:
            _setns(self._home_ns, "the starting namespace")
            os.close(self._home_ns)
            self._home_ns = None


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {what}")


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def shaped_link(rate: str, delay_ms: float = 1.0) -> Iterator[ShapedLink]:
    """A ShapedLink that is removed on exit, also on SIGTERM/SIGHUP/SIGINT (turned into exceptions
    so that every ``finally`` on the way runs: servers stop, then the namespaces go)."""
    remove_stale()
    saved = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    link = ShapedLink(rate, delay_ms)
    try:
        link.up()
        yield link
    finally:
        link.down()
        for s, handler in saved.items():
            signal.signal(s, handler)
