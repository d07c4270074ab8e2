"""A Grid wrapper that bounds every wait of a round and counts what went wrong.

Flower's own grids leave three waits open: a reply that never comes is dropped silently
when a round times out, a dead node keeps being sampled until its heartbeat lapses
(~60 s), and a strategy waits without limit while fewer than its minimum of nodes are
connected. :class:`RoundGrid` gives each a bound and a log line, and polls for replies
every ``poll_interval`` seconds (Flower's HTTP grid sleeps 3 s between polls).
"""

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedge.config import default
from fedge.errors import FedgeError

log = logging.getLogger("fedge.server")

# Reply error code (outside Flower's ErrorCode range) for a result that came after the
# round's deadline: a simulated late device. Counted as a timeout, like a missing reply.
MISSED_DEADLINE = 100


class NotEnoughClients(FedgeError):
    """Fewer clients than a round needs stayed connected for too long."""


@dataclass
class RoundStats:
    """What happened to the messages of one ``send_and_receive``."""

    sent: int = 0
    replies: int = 0
    failures: int = 0  # error replies: the ClientApp raised, or its node was unavailable
    timeouts: int = 0  # no reply before the round's deadline
    discarded: bool = False  # fewer than `min_replies` results: nothing was aggregated
    simulated_seconds: float | None = None  # the round's duration on a simulated clock


class GridWrapper(Grid):
    """A Grid that delegates everything to ``grid``; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RoundGrid(GridWrapper):
    """Delegates to ``grid``; ``send_and_receive`` waits at most its ``timeout``.

    - A round that gets fewer than ``min_replies`` results returns none, so the strategy
      keeps the current global model instead of aggregating a handful of updates.
    - A node that failed or timed out is not sampled for ``quarantine`` seconds, unless
      the round would otherwise lack its minimum of nodes.
    - While fewer than ``min_nodes`` are connected, :meth:`get_node_ids` raises
      :class:`NotEnoughClients` after ``join_timeout`` seconds.
    - With a simulation's ``clock`` (seconds), quarantines run on it and each round's
      duration on it is reported as ``RoundStats.simulated_seconds``.
    """

    def __init__(self, grid: Grid, *, min_nodes: int, min_replies: int,
                 join_timeout: float, quarantine: float = default("quarantine"),
                 poll_interval: float = default("poll_interval"),
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__(grid)
        self.clock = clock
        self.min_nodes, self.min_replies = min_nodes, min_replies
        self.join_timeout, self.quarantine = join_timeout, quarantine
        self.poll_interval = poll_interval
        self.stats: list[RoundStats] = []  # one per send_and_receive with messages
        self.last_failure: str | None = None  # the latest client failure, as logged
        self._suspended_until: dict[int, float] = {}
        self._short_since: float | None = None
        self._last_wait_log = 0.0

    def get_node_ids(self) -> Iterable[int]:
        now = time.monotonic()
        connected = list(self.grid.get_node_ids())
        healthy = [n for n in connected
                   if self._suspended_until.get(n, 0.0) <= self._quarantine_now()]
        nodes = healthy if len(healthy) >= self.min_nodes else connected
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        self._short_since = self._short_since or now
        waited = now - self._short_since
        if waited > self.join_timeout:
            raise NotEnoughClients(
                f"only {len(nodes)} of the {self.min_nodes} clients a round needs stayed "
                f"connected for {self.join_timeout:.0f} s")
        if now - self._last_wait_log >= 10.0:
            self._last_wait_log = now
            log.info("waiting for clients: %d connected, %d needed (giving up in %.0f s)",
                     len(nodes), self.min_nodes, self.join_timeout - waited)
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        # Flower returns ids in message order, None for a message it could not push.
        simulated_start = self.clock() if self.clock else None
        ids = list(self.grid.push_messages(messages))
        destination = {i: m.metadata.dst_node_id
                       for i, m in zip(ids, messages, strict=True) if i is not None}
        stats = RoundStats(sent=len(messages), failures=ids.count(None))
        self.stats.append(stats)
        if stats.failures:
            log.warning("%d of %d messages could not be pushed to the clients",
                        stats.failures, stats.sent)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending, replies = set(destination), []
        while pending:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        # Replies in the order the messages went out: aggregation sums are then the same
        # float sums on every run with the same seed.
        order = {message_id: position for position, message_id in enumerate(ids)}
        replies.sort(key=lambda reply: order[reply.metadata.reply_to_message_id])
        # A late result counts as no reply, as it would in a deployment.
        late = [destination[r.metadata.reply_to_message_id] for r in replies
                if _missed_deadline(r)]
        replies = [r for r in replies if not _missed_deadline(r)]
        silent = [destination[i] for i in pending] + late
        if simulated_start is not None:
            stats.simulated_seconds = self.clock() - simulated_start
        return self._settle(replies, silent, destination, stats, timeout)

    def suspend(self, node: int) -> None:
        """Do not sample ``node`` for ``quarantine`` seconds: it failed or missed its
        deadline."""
        self._suspended_until[node] = self._quarantine_now() + self.quarantine

    def _quarantine_now(self) -> float:
        return self.clock() if self.clock else time.monotonic()

    def _settle(self, replies: list[Message], silent: list[int], destination: dict[str, int],
                stats: RoundStats, timeout: float | None) -> list[Message]:
        for node in silent:
            log.warning("client node %d did not answer within %.0f s; not sampled for "
                        "%.0f s", node, timeout or 0, self.quarantine)
            self.suspend(node)
        failed = [r for r in replies if r.has_error()]
        for reply in failed:
            # The node the message went to: the SuperLink answers for an unavailable node
            # itself, from its own node id.
            node = destination[reply.metadata.reply_to_message_id]
            self.last_failure = f"client node {node} failed: {reply.error.reason}"
            log.warning("%s", self.last_failure)
            self.suspend(node)
        stats.replies = len(replies) - len(failed)
        stats.failures += len(failed)
        stats.timeouts = len(silent)
        if stats.sent and stats.replies < self.min_replies:
            stats.discarded = True
            log.warning("only %d of %d clients returned results (minimum %d): the round "
                        "keeps the current global model", stats.replies, stats.sent,
                        self.min_replies)
            return []
        return replies


def _missed_deadline(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == MISSED_DEADLINE
