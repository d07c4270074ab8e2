"""Child processes (Flower's SuperLink, SuperNode, ``flwr run``) that never outlive us,
and their output, shown without Python tracebacks."""

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from fedge import guard
from fedge.errors import FedgeError

# A stopped child's guard ends its process group within guard.GRACE seconds; it gets a
# little longer before the guard itself is killed.
STOP_BOUND = guard.GRACE + 3.0

FLOWER_ENV = {  # defaults; the environment may set others
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # `flwr run` would otherwise `uv sync` the app and pull a multi-GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec checks for work every second by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def interpreter_bins() -> list[str]:
    """The folders where this Python's packages install their commands: beside the
    interpreter (a virtual environment's ``bin``, even when it is not activated), its
    installation scheme's scripts folder, and outside a virtual environment the user's
    (``pip install --user``)."""
    folders = [str(Path(sys.executable).parent), sysconfig.get_path("scripts")]
    if sys.prefix == sys.base_prefix:
        folders.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    return list(dict.fromkeys(folders))


def flower_command(name: str) -> str:
    """The path of Flower's command ``name`` (``flower-superlink``, ``flwr``...) installed
    with this Python, whatever PATH says; a clear error when it is missing."""
    folders = interpreter_bins()
    found = shutil.which(name, path=os.pathsep.join(folders))
    if found is None:
        raise FedgeError(f"Flower's `{name}` command is not installed with this Python "
                         f"({sys.executable}; looked in {', '.join(folders)}): install "
                         "fedge and its dependencies into this environment (pip install -e "
                         ". in fedge's folder)")
    return found


class Children:
    """Starts children, each under a :mod:`fedge.guard` that ends everything the child
    starts, and stops them on exit: also on SIGTERM, which becomes a clean shutdown of
    the calling command. The guards are in our process group, so stopping the group (as
    service managers do) stops them too, and they stop their children when we die."""

    def __init__(self, env: dict[str, str]) -> None:
        # Flower starts its helpers (flower-superexec, flwr-serverapp...) by name: find
        # those installed with this interpreter, even in a venv that is not activated.
        path = os.pathsep.join([*interpreter_bins(), os.environ.get("PATH", "")])
        self.env = {**FLOWER_ENV, **os.environ, "PATH": path, **env}
        self.processes: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], log: Path | None = None,
              capture: bool = False) -> subprocess.Popen:
        """``args`` as a guarded child; its output is appended to ``log``, or readable
        from the returned process's ``stdout`` with ``capture``."""
        output = open(log, "ab") if log else (  # noqa: SIM115 - lives as long as the child
            subprocess.PIPE if capture else None)
        process = subprocess.Popen([sys.executable, "-m", "fedge.guard", *args], env=self.env,
                                   preexec_fn=guard.die_with_parent, stdout=output,
                                   stderr=subprocess.STDOUT if output else None)
        if log:
            output.close()  # the child holds its own copy
        self.processes.append(process)
        return process

    def end(self, process: subprocess.Popen) -> int:
        """Stop ``process`` and everything it started; its exit status."""
        if process.poll() is None:
            process.terminate()
        try:
            return process.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            self.end(process)

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


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
# Exceptions that end a process as it is told to stop: nothing to report.
STOPPING = ("KeyboardInterrupt", "SystemExit")


def plain(line: str) -> str:
    """A log line without colour codes and line ending."""
    return ANSI_CODES.sub("", line).rstrip("\r\n")


class TracebackFilter:
    """Passes a child's output lines on, but each Python traceback only as its last line
    (the exception), prefixed with ``who`` — or not at all for an exception that is the
    child being stopped. Feed it every line; it returns the line to show, or None."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._in_traceback = False

    def __call__(self, line: str) -> str | None:
        text = plain(line)
        if text.startswith(("Traceback (most recent call last)", "Exception ignored in",
                            "Exception in thread")):
            self._in_traceback = True
            return None
        if not self._in_traceback:
            return line
        if not text.strip() or text[0].isspace() or text.startswith((
                "During handling of the above exception",
                "The above exception was the direct cause")):
            return None
        self._in_traceback = False
        if text.split(":")[0].rsplit(".", 1)[-1] in STOPPING:
            return None
        return f"{self.who} raised {text}\n"


def relay_output(stream: IO[bytes], observe: Callable[[str], None], who: str,
                 verbose: bool = False, sink: IO[str] | None = None,
                 hide: Callable[[str], bool] | None = None) -> threading.Thread:
    """Read ``stream`` to its end on a background thread: every line goes to ``observe``
    (without colour codes), and to ``sink`` (stderr) as it is — without tracebacks
    unless ``verbose``, and without the lines (without colour codes) ``hide`` picks."""
    show = (lambda line: line) if verbose else TracebackFilter(who)

    def pump() -> None:
        out = sink or sys.stderr
        for raw in stream:
            line = raw.decode(errors="replace")
            observe(plain(line))
            if hide is not None and hide(plain(line)):
                continue
            if (shown := show(line)) is not None:
                out.write(shown)
                out.flush()

    thread = threading.Thread(target=pump, daemon=True, name=f"output of {who}")
    thread.start()
    return thread


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


def check_listen_host(host: str, option: str) -> None:
    """A clear error, before anything starts, when no server can listen on ``host``: it
    does not resolve, or it is not an address of this machine."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise FedgeError(f"{option} {host!r} is neither an IP address nor a host name that "
                         "resolves; give one of this machine's addresses, or 0.0.0.0 to "
                         "listen on all of them") from None
    with socket.socket(family, kind) as sock:
        try:
            sock.bind(address)  # port 0: only the address is tried
        except OSError as error:
            reason = ("is not an address of this machine" if error.errno == errno.EADDRNOTAVAIL
                      else f"cannot be listened on ({error.strerror})")
            raise FedgeError(f"{option} {host} {reason}; give one of this machine's "
                             "addresses, or 0.0.0.0 to listen on all of them") from None


def check_port_free(host: str, port: int, option: str) -> None:
    """A clear error, before anything starts, when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers do: a port in TIME_WAIT after an earlier run is free to use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            reason = ("is already in use" if error.errno == errno.EADDRINUSE
                      else f"cannot be listened on ({error.strerror})")
            raise FedgeError(f"port {port} on {host} {reason}; choose another with "
                             f"{option}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
