"""Child processes (Flower's SuperLink, SuperNode, ``flwr run``) that never outlive us."""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fedge.errors import FedgeError

PR_SET_PDEATHSIG = 1

FLOWER_ENV = {  # defaults; the environment may set others
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # `flwr run` would otherwise `uv sync` the app and pull a multi-GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec checks for work every second by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when its parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Children:
    """Starts children in our process group, so that stopping the group (as service
    managers do) stops them too, and ends them on exit: also on SIGTERM, which becomes
    a clean shutdown of the calling command."""

    def __init__(self, env: dict[str, str]) -> None:
        # Flower starts its helpers (flower-superexec, flwr-serverapp...) by name: find
        # those installed beside this interpreter, even in a venv that is not activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**FLOWER_ENV, **os.environ, "PATH": path, **env}
        self.processes: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], log: Path | None = None) -> subprocess.Popen:
        output = open(log, "ab") if log else None  # noqa: SIM115 - lives as long as the child
        process = subprocess.Popen(list(args), env=self.env, preexec_fn=_die_with_parent,
                                   stdout=output, stderr=subprocess.STDOUT if log else None)
        self.processes.append(process)
        return process

    def stop(self, grace: float = 10.0) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
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
