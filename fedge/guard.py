"""``python -m fedge.guard COMMAND [ARGS...]``: run a command so that nothing it starts
outlives it.

fedge starts Flower's processes (SuperLink, SuperNode, ``flwr run``) through this guard.
They start helpers of their own (``flower-superexec``, ``flwr-clientapp``,
``flwr-serverapp``) that notice their parent's end only by polling, if at all, and a
SuperNode can hang after it has given up. The guard runs the command in a process group
of its own (out of reach of the terminal's Ctrl-C, which fedge handles) and, once the
command has ended or the guard is told to stop (SIGTERM, SIGINT or SIGHUP; the kernel
sends SIGTERM when the fedge process that started it dies, even by SIGKILL), asks the
group and every other descendant to stop and kills what is left after :data:`GRACE`
seconds. Its exit status is the command's (128 + N for a command ended by signal N).

Only the standard library: it starts in a few milliseconds.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE = 5.0  # seconds a stopped group has to exit before it is killed
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # Linux prctl options


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value)


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies, even by SIGKILL."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _adopt_orphans() -> None:
    """Descendants whose parent exits are re-parented to the guard (Linux): they stay
    within its reach, and their exit is reaped here."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


class Group:
    """The command and everything it started: its process group and, on Linux, every
    descendant of the guard (Flower starts some helpers in sessions of their own; as a
    subreaper the guard stays their ancestor even when their parent exits)."""

    def __init__(self, command: list[str]) -> None:
        # Should the guard itself be killed, the command is still told to stop.
        self.leader = subprocess.Popen(command, process_group=0,
                                       preexec_fn=die_with_parent).pid
        self.status: int | None = None

    def reap(self) -> None:
        """Collect every exited child: the command (its status is kept) and orphans."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.leader:
                self.status = os.waitstatus_to_exitcode(status)

    def members(self) -> set[int]:
        """The processes still to end (exited ones waiting to be reaped included)."""
        members = _descendants(os.getpid())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.leader, 0)
            members.add(self.leader)  # a group member, if /proc cannot tell
        return members

    def signal(self, signum: int) -> None:
        """``signum`` once to each process: a second SIGTERM would cut short the graceful
        exit that Flower's handler of the first one starts."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.leader, signum)
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) != self.leader:
                    os.kill(pid, signum)

    def end(self, grace: float = GRACE) -> None:
        """SIGTERM to all; SIGKILL to whatever remains after ``grace`` seconds."""
        self.signal(signal.SIGTERM)
        self._wait(grace)
        self.signal(signal.SIGKILL)
        self._wait(2.0)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.reap()
            if not self.members() or time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def _descendants(root: int) -> set[int]:
    """Every live descendant of process ``root``, read from /proc (Linux); empty where
    there is no /proc."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry.name}/stat", "rb") as stat:
                        # pid (comm) state ppid ...; comm may hold spaces and parentheses
                        parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
                    children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def main(command: list[str]) -> int:
    if not command:
        print("usage: python -m fedge.guard COMMAND [ARGS...]", file=sys.stderr)
        return 2
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: stop_requested.append(number))
    _adopt_orphans()
    try:
        group = Group(command)
    except OSError as error:
        print(f"error: cannot start {command[0]}: {error.strerror}", file=sys.stderr)
        return 127
    while group.status is None and not stop_requested:
        group.reap()
        time.sleep(0.05)
    group.end()
    group.reap()
    status = group.status if group.status is not None else -signal.SIGKILL
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
