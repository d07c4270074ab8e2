"""``flower-supernode`` with a shorter idle poll: the one place fedge reaches into Flower.

Flower 1.42's SuperNode sleeps a hard-coded 3 s whenever the SuperLink has no message
for it, and waits for replies in 0.5 s steps (``flwr/supernode/start_client_internal.py``),
which adds up to 3 s to every round. This launcher caps those sleeps at
``FEDGE_SUPERNODE_POLL`` seconds and then runs Flower's own command unchanged.
Written for flwr 1.42 (pinned in pyproject.toml); ``tests/test_backends.py`` fails
loudly if Flower's code changes under it.

    python -m fedge.client.supernode [flower-supernode options]
"""

import os
import time
import types

POLL_ENV = "FEDGE_SUPERNODE_POLL"
DEFAULT_POLL = 0.5  # 2 checks a second per idle device: light on the SuperLink


def short_sleeps(poll: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never exceeds ``poll``."""
    functions = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    functions["sleep"] = lambda seconds: time.sleep(min(seconds, poll))
    return types.SimpleNamespace(**functions)


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = short_sleeps(float(os.environ.get(POLL_ENV, DEFAULT_POLL)))
    flower_supernode()


if __name__ == "__main__":
    main()
