"""Child processes (Flower's SuperLink, SuperNode, ``flwr run``) that never outlive us."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fedge.errors import FedgeError

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # `flwr run` would otherwise `uv sync` the app and pull a multi-GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec checks for work every second by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def flower_command(name: str) -> str:
    """The Flower executable installed beside this Python interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class Children:
    """Starts children in their own process groups and ends them all on exit: also on
    SIGTERM, which is turned into a clean shutdown of the calling command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **FLOWER_ENV, **env}
        self.processes: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], log: Path | None = None) -> subprocess.Popen:
        output = open(log, "ab") if log else None  # noqa: SIM115 - lives as long as the child
        process = subprocess.Popen(list(args), env=self.env, start_new_session=True,
                                   stdout=output, stderr=subprocess.STDOUT if log else None)
        self.processes.append(process)
        return process

    def stop(self, grace: float = 10.0) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    @contextlib.contextmanager
    def running(self) -> Iterator["Children"]:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float,
                  what: str) -> None:
    """Until ``process`` listens on ``host:port``; a clear error if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedgeError(f"{what} exited with status {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise FedgeError(f"{what} did not start listening on {host}:{port} within {timeout:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
