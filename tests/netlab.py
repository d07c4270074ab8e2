"""A network lab for tests: hosts in network namespaces of their own, joined by a
user-space router that can impair each host's link (delay, loss, rate) and whose links
can go down and up, as real networks do.

The kernel here has no ``sch_netem``, so impairment lives in the router: a thread of the
test process that owns one TUN device per host (moved into the host's namespace, where
it is the host's only link, ``wan0``), reads each IPv4 packet a host sends, and delivers
it to the host it is addressed to after passing the sender's uplink and the receiver's
downlink: a loss draw, a queue served at the link's rate, then the link's delay. Only
the lab's own addresses are routed; everything else is dropped.

    with network_lab({"server": Impairment(), "phone": Impairment(0.15, 0.05, 1e6)}) as lab:
        subprocess.run(lab.command("phone", ["ping", "-c1", lab.address("server")]))

Everything the lab made (namespaces, links, the processes still running in its
namespaces) is gone when the ``with`` block ends, also on failures and timeouts. Tests
that need a lab are skipped, with the reason, where one cannot be made (not root, no
``ip``, no network namespaces or TUN devices).
"""

import contextlib
import fcntl
import heapq
import ipaddress
import itertools
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

SUBNET = ipaddress.ip_network("10.200.0.0/24")  # inside the lab's namespaces only
DEVICE = "wan0"  # each host's one link
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
QUEUE_SECONDS = 0.5  # a rate-limited link drops what would queue longer than this
COMMAND_TIMEOUT = 30.0  # seconds for one `ip` command


@dataclass(frozen=True)
class Impairment:
    """One host's link, the same each way: ``delay`` seconds, a share ``loss`` of the
    packets dropped at random, at most ``rate`` bits per second (0: unlimited)."""

    delay: float = 0.0
    loss: float = 0.0
    rate: float = 0.0


class Direction:
    """One direction of a link: where its queue stands, and what it does to a packet."""

    def __init__(self, impairment: Impairment, draw: random.Random) -> None:
        self.impairment, self.draw = impairment, draw
        self.free_at = 0.0  # when the packets queued so far have been sent

    def passage(self, size: int, now: float) -> float | None:
        """When a packet of ``size`` bytes arriving ``now`` leaves the link; None: lost."""
        link = self.impairment
        if link.loss and self.draw.random() < link.loss:
            return None
        sent = now
        if link.rate:
            start = max(now, self.free_at)
            if start - now > QUEUE_SECONDS:
                return None  # the queue is full
            sent = self.free_at = start + 8 * size / link.rate
        return sent + link.delay


class Router:
    """Forwards IPv4 packets between the hosts' TUN devices, on a thread of its own."""

    def __init__(self, links: dict[str, tuple[int, str, Impairment]], seed: int = 0) -> None:
        draw = random.Random(seed)
        self.fds = [fd for fd, _, _ in links.values()]
        self.by_address = {ipaddress.ip_address(address).packed: fd
                           for fd, address, _ in links.values()}
        self.up = {fd: Direction(impairment, draw) for fd, _, impairment in links.values()}
        self.down = {fd: Direction(impairment, draw) for fd, _, impairment in links.values()}
        self.queue: list[tuple[float, int, int, int, bytes]] = []  # (due, seq, stage, fd, ...)
        self.order = itertools.count()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="netlab router")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopping.is_set():
            wait = 0.05 if not self.queue else min(0.05, max(0.0, self.queue[0][0]
                                                              - time.monotonic()))
            readable, _, _ = select.select(self.fds, [], [], wait)
            now = time.monotonic()
            for fd in readable:
                self._read_all(fd, now)
            while self.queue and self.queue[0][0] <= now:
                _, _, stage, fd, packet = heapq.heappop(self.queue)
                if stage == 1:  # through the sender's uplink: on to the receiver's downlink
                    self._schedule(self.down[fd].passage(len(packet), now), 2, fd, packet)
                else:
                    with contextlib.suppress(OSError):  # a link that is down drops it
                        os.write(fd, packet)

    def _read_all(self, fd: int, now: float) -> None:
        while True:
            try:
                packet = os.read(fd, 65536)
            except OSError:  # nothing more to read (or the link is down)
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue  # IPv4 only: the lab's hosts speak nothing else to each other
            target = self.by_address.get(packet[16:20])
            if target is not None:
                self._schedule(self.up[fd].passage(len(packet), now), 1, target, packet)

    def _schedule(self, due: float | None, stage: int, fd: int, packet: bytes) -> None:
        if due is not None:
            heapq.heappush(self.queue, (due, next(self.order), stage, fd, packet))


class Lab:
    """Hosts in namespaces of their own, each with one address on the lab's subnet."""

    def __init__(self, hosts: dict[str, Impairment]) -> None:
        tag = uuid.uuid4().hex[:8]
        self.hosts = dict(hosts)
        self.namespaces = {host: f"fedge-lab-{tag}-{i}" for i, host in enumerate(hosts)}
        self.addresses = {host: str(SUBNET[i + 1]) for i, host in enumerate(hosts)}
        self.fds: list[int] = []
        self.router: Router | None = None

    def address(self, host: str) -> str:
        return self.addresses[host]

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` run on ``host``: in its namespace, with the test's environment."""
        return ["ip", "netns", "exec", self.namespaces[host], *args]

    def link_down(self, host: str) -> None:
        """Pull ``host``'s cable: its link goes down, and its routes with it."""
        self._ip(["-n", self.namespaces[host], "link", "set", DEVICE, "down"])

    def link_up(self, host: str) -> None:
        self._ip(["-n", self.namespaces[host], "link", "set", DEVICE, "up"])

    def build(self) -> None:
        links = {}
        for host, impairment in self.hosts.items():
            namespace = self.namespaces[host]
            self._ip(["netns", "add", namespace])
            self._ip(["-n", namespace, "link", "set", "lo", "up"])
            fd, name = _tun()
            self.fds.append(fd)
            self._ip(["link", "set", name, "netns", namespace])
            self._ip(["-n", namespace, "link", "set", name, "name", DEVICE])
            self._ip(["-n", namespace, "addr", "add",
                      f"{self.addresses[host]}/{SUBNET.prefixlen}", "dev", DEVICE])
            self._ip(["-n", namespace, "link", "set", DEVICE, "up"])
            links[host] = (fd, self.addresses[host], impairment)
        self.router = Router(links)
        self.router.start()

    def close(self) -> None:
        """End every process left in the lab's namespaces, then the router, the links
        and the namespaces."""
        for namespace in self.namespaces.values():
            _kill_all_in(namespace)
        if self.router is not None:
            self.router.stop()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True,
                           timeout=COMMAND_TIMEOUT)

    @staticmethod
    def _ip(args: list[str]) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _tun() -> tuple[int, str]:
    """A new TUN device (IPv4 packets without a header) in this namespace: its file
    descriptor and the name the kernel gave it. It lives as long as the descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    request = struct.pack("16sH", b"fedgelab%d", IFF_TUN | IFF_NO_PI)
    name = fcntl.ioctl(fd, TUNSETIFF, request)[:16].rstrip(b"\0").decode()
    return fd, name


def _kill_all_in(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (all of them the test's), until none is left."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while time.monotonic() < deadline:
        result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                text=True, timeout=COMMAND_TIMEOUT)
        pids = [int(pid) for pid in result.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def unavailable() -> str | None:
    """Why no lab can be made on this machine, or None."""
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    try:
        os.close(_tun()[0])
    except OSError as error:
        return f"cannot make a TUN device: {error.strerror}"
    probe = f"fedge-lab-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_TIMEOUT)
    return None


@contextlib.contextmanager
def network_lab(hosts: dict[str, Impairment]) -> Iterator[Lab]:
    """A lab of ``hosts`` (name: its link), torn down when the block ends; the calling
    test is skipped, with the reason, where no lab can be made."""
    reason = unavailable()
    if reason:
        pytest.skip(f"network lab: {reason}")
    lab = Lab(hosts)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
