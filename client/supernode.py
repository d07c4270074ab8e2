"""``flower-supernode`` with a shorter idle poll and a bounded exit: the one place fedge
reaches into Flower's SuperNode.

Flower 1.42's SuperNode sleeps a hard-coded 3 s whenever the SuperLink has no message
for it, and waits for replies in 0.5 s steps (``flwr/supernode/start_client_internal.py``),
which adds up to 3 s to every round. This launcher caps those sleeps at
``FEDGE_SUPERNODE_POLL`` seconds and then runs Flower's own command unchanged.

Flower logs why a connection attempt failed only at DEBUG level; the launcher prints
each new reason on one line (``fedge: connection attempt failed: ...``), so that
``fedge client`` can tell its user what went wrong without Flower's debug output.

When its server has gone away for longer than ``--max-wait-time``, Flower's SuperNode
logs ``Giving up reconnection`` and returns from its main loop, but leaves its Runtime
API thread running, so the interpreter waits for it forever. The launcher ends the
process as soon as Flower's command returns or exits, with Flower's exit status
(:data:`LOST_SERVER` when it returned after losing its server).

Written for flwr 1.42 (pinned in pyproject.toml); ``tests/test_backends.py`` fails
loudly if Flower's code changes under it.

    python -m fedge.client.supernode [flower-supernode options]
"""

import logging
import os
import sys
import time
import types

from fedge.processes import interpreter_bins

POLL_ENV = "FEDGE_SUPERNODE_POLL"
DEFAULT_POLL = 0.5  # 2 checks a second per idle device: light on the SuperLink
LOST_SERVER = 75  # EX_TEMPFAIL: the SuperNode had joined, then lost its server


def short_sleeps(poll: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never exceeds ``poll``."""
    functions = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    functions["sleep"] = lambda seconds: time.sleep(min(seconds, poll))
    return types.SimpleNamespace(**functions)


FAILED_ATTEMPT = "Connection attempt failed with exception: "  # Flower's DEBUG message


class AttemptReasons(logging.Handler):
    """Prints the reason of a failed connection attempt whenever it changes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(FAILED_ATTEMPT) and message != self.last:
            self.last = message
            print(f"fedge: connection attempt failed: {message[len(FAILED_ATTEMPT):]}",
                  file=sys.stderr, flush=True)


def run_supernode() -> int:
    """Flower's ``flower-supernode`` with short sleeps; its exit status."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = short_sleeps(float(os.environ.get(POLL_ENV, DEFAULT_POLL)))
    # Flower starts flower-superexec by name: the one installed with this Python.
    os.environ["PATH"] = os.pathsep.join([*interpreter_bins(), os.environ.get("PATH", "")])
    logging.getLogger("flwr").addHandler(AttemptReasons())
    try:
        flower_supernode()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return LOST_SERVER


def main() -> None:
    status = run_supernode()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # not sys.exit: that would wait for Flower's threads


if __name__ == "__main__":
    main()
