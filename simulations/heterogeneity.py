"""Unequal, unreliable devices in simulation, on a simulated clock.

Real fleets are not ten identical machines that always answer. Three seeded draws make the
simulated clients behave like devices (client ``k`` is the ``k``-th node, its partition):

- **speed**: ``round(slow_fraction · clients)`` clients, chosen once from the seed, train
  ``slowdown`` times slower than the others;
- **offline**: in every round each client is offline with probability ``offline_fraction``:
  not connected, so the strategy cannot sample it. At least ``min_clients`` stay online
  (those that drew the largest numbers), so a round never waits for connections;
- **drop**: a sampled client drops out mid-round with probability ``drop_fraction``: its
  result never arrives, and the server gets Flower's "node unavailable" error, as from a
  SuperLink whose node went away. The server counts it as a failure.

Time is simulated, not measured, so the same seed gives the same run on any machine. A
client's round takes

    t_k = slowdown_k · epochs_k · n_k / samples_per_second

simulated seconds (``n_k`` its training samples, ``epochs_k`` the local epochs it ran,
``slowdown_k`` 1 or ``slowdown``). The server's deadline applies as in deployment: a client
with ``t_k > round_timeout`` missed the round and counts as a timeout, and the round lasts
``round_timeout``; otherwise it lasts ``max_k t_k`` over the results (a drop does not
lengthen it). Nothing waits in real time: late results are turned into error replies at
once, and the server's quarantine of failed and late clients (``quarantine`` seconds) runs
on the simulated clock.

Without rounds (FedBuff, :class:`AsynchronousDevices`) every dispatch of tasks takes the
place of a round in these draws, and each result arrives at ``sent + t_k`` (a late one
at ``sent + round_timeout``, as an error; a drop at once).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedge.config import RunConfig, default
from fedge.errors import FedgeError
from fedge.protocol import METRICS, WEIGHT_KEY
from fedge.server.grid import MISSED_DEADLINE, GridWrapper

# Flower's ErrorCode.NODE_UNAVAILABLE: the SuperLink's reply for a node that went away.
NODE_UNAVAILABLE = 5
# Purposes of the seeded draws, so that each has its own random stream.
_SLOW, _OFFLINE, _DROP = 1, 2, 3


@dataclass(frozen=True)
class SimulatedFleet:
    """The seeded behaviour of ``clients`` simulated devices (see the module docstring)."""

    clients: int
    seed: int
    offline_fraction: float = default("offline_fraction")
    drop_fraction: float = default("drop_fraction")
    slow_fraction: float = default("slow_fraction")
    slowdown: float = default("slowdown")
    samples_per_second: float = default("samples_per_second")
    min_online: int = 1

    @classmethod
    def from_config(cls, config: RunConfig) -> "SimulatedFleet":
        simulation = config.simulation
        return cls(clients=config.strategy.clients, seed=config.seed,
                   offline_fraction=simulation.offline_fraction,
                   drop_fraction=simulation.drop_fraction, slow_fraction=simulation.slow_fraction,
                   slowdown=simulation.slowdown, samples_per_second=simulation.samples_per_second,
                   min_online=config.strategy.min_clients)

    @property
    def heterogeneous(self) -> bool:
        """Whether any client is ever slow, offline or dropping; if not, the simulation
        runs without a simulated clock, as before."""
        return max(self.offline_fraction, self.drop_fraction, self.slow_fraction) > 0

    def slow_clients(self) -> list[int]:
        count = round(self.slow_fraction * self.clients)
        chosen = self._draws(_SLOW).permutation(self.clients)[:count]
        return sorted(int(k) for k in chosen)

    def online(self, server_round: int) -> list[int]:
        """The clients connected during ``server_round``: each is offline with probability
        ``offline_fraction``, but the ``min_online`` largest draws always stay online."""
        draws = self._draws(_OFFLINE, server_round).random(self.clients)
        keep = set(np.argsort(-draws, kind="stable")[:self.min_online].tolist())
        keep |= set(np.flatnonzero(draws >= self.offline_fraction).tolist())
        return sorted(keep)

    def drops(self, server_round: int, client: int) -> bool:
        """Whether ``client`` drops out mid-round if it is sampled in ``server_round``
        (drawn for every client, so it does not depend on who else was sampled)."""
        return bool(self._draws(_DROP, server_round).random(self.clients)[client]
                    < self.drop_fraction)

    def training_seconds(self, client: int, epochs: float, samples: float) -> float:
        """``t_k = slowdown_k · epochs_k · n_k / samples_per_second``."""
        slowdown = self.slowdown if client in self.slow_clients() else 1.0
        return slowdown * epochs * samples / self.samples_per_second

    def _draws(self, purpose: int, server_round: int = 0) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, purpose, server_round]))


class HeterogeneousGrid(GridWrapper):
    """``grid``'s nodes as the devices of ``fleet``, with the server's ``round_timeout``
    applied on a simulated clock (:meth:`clock`, for the server's quarantine).

    Rounds are counted from ``first_round`` (after a resumed run's checkpoint), one per
    batch of pushed messages: fedge's strategies send one train message per client per
    round and skip Flower's evaluate round-trip.
    """

    def __init__(self, grid: Grid, fleet: SimulatedFleet, round_timeout: float,
                 first_round: int = 1) -> None:
        super().__init__(grid)
        self.fleet, self.round_timeout = fleet, round_timeout
        self._next_round = first_round
        self._now = 0.0
        self._nodes = sorted(grid.get_node_ids())  # client k is the k-th node
        # message id → (message, its round, the simulated time it was sent)
        self._sent: dict[str, tuple[Message, int, float]] = {}

    def clock(self) -> float:
        """Simulated seconds since the run (or its resumption) started."""
        return self._now

    def get_node_ids(self) -> Iterable[int]:
        return [self._nodes[k] for k in self.fleet.online(self._next_round)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        server_round, self._next_round = self._next_round, self._next_round + 1
        # Dropped clients train too: they vanish after doing the work, mid-round.
        ids = list(self.grid.push_messages(messages))
        for message_id, message in zip(ids, messages, strict=True):
            if message_id is not None:
                self._sent[message_id] = (message, server_round, self._now)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for reply in self.grid.pull_messages(message_ids):
            reply, arrives = self._as_device(reply)
            self._now = max(self._now, arrives)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _as_device(self, reply: Message) -> tuple[Message, float]:
        """The reply the server would get from this device, and when it arrives: an error
        if the device dropped out (at once: a drop does not lengthen a round) or missed
        the deadline (at the deadline)."""
        message, server_round, sent = self._sent.pop(reply.metadata.reply_to_message_id)
        client = self._nodes.index(message.metadata.dst_node_id)
        if self.fleet.drops(server_round, client):
            return Message(Error(NODE_UNAVAILABLE, f"simulated: client {client} dropped out "
                                                   "mid-round"), reply_to=message), sent
        if reply.has_error():
            return reply, sent
        metrics = reply.content[METRICS]
        seconds = self.fleet.training_seconds(client, float(metrics["epochs"]),
                                              float(metrics[WEIGHT_KEY]))
        if seconds > self.round_timeout:
            return Message(Error(MISSED_DEADLINE, f"simulated: client {client} needed "
                                                  f"{seconds:.1f} s, the deadline is "
                                                  f"{self.round_timeout:g} s"),
                           reply_to=message), sent + self.round_timeout
        return reply, sent + seconds


class AsynchronousDevices(HeterogeneousGrid):
    """:class:`HeterogeneousGrid` for a server without rounds (FedBuff): every push is a
    dispatch, with its own draws of who is online and who drops out, and each reply
    arrives at its own simulated time. A pull returns the earliest of the asked-for
    replies still to come (all of those that arrive then), moving the clock to that time:
    the server's wait for its next result takes no real time."""

    def __init__(self, grid: Grid, fleet: SimulatedFleet, round_timeout: float,
                 first_round: int = 1) -> None:
        super().__init__(grid, fleet, round_timeout, first_round)
        self._arrivals: dict[str, tuple[float, int, Message]] = {}  # id → (time, order, reply)
        self._pushed = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        for reply in self.grid.pull_messages([i for i in ids if i is not None]):
            message_id = reply.metadata.reply_to_message_id
            reply, arrives = self._as_device(reply)
            self._arrivals[message_id] = (arrives, self._pushed, reply)
            self._pushed += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        asked = [self._arrivals[i] + (i,) for i in message_ids if i in self._arrivals]
        if not asked:
            return []
        self._now = max(self._now, min(arrives for arrives, *_ in asked))
        due = sorted(entry for entry in asked if entry[0] <= self._now)
        for *_, message_id in due:
            del self._arrivals[message_id]
        return [reply for _, _, reply, _ in due]


def check_heterogeneity(config: RunConfig) -> None:
    """Device heterogeneity, and FedBuff, need the in-process backend, where the simulated
    clock runs, and one message per client per round (SecAgg+ exchanges several)."""
    if config.strategy.name == "fedbuff" and config.simulation.backend == "ray":
        raise FedgeError("--strategy fedbuff needs backend inprocess: its simulation runs "
                         "on the simulated clock, which the Ray backend has not")
    if not SimulatedFleet.from_config(config).heterogeneous:
        return
    if config.simulation.backend == "ray":
        raise FedgeError("offline_fraction, drop_fraction and slow_fraction need backend "
                         "inprocess: the Ray backend has no simulated clock")
    if config.privacy.secagg:
        raise FedgeError("offline_fraction, drop_fraction and slow_fraction do not work with "
                         "secagg yet: the simulated devices expect one message per round")


def describe_devices(config: RunConfig) -> str | None:
    """One line for the start of a run, or None when every device is alike."""
    fleet = SimulatedFleet.from_config(config)
    if not fleet.heterogeneous:
        return None
    slow = len(fleet.slow_clients())
    return (f"{slow} slow clients (×{fleet.slowdown:g}), " if slow else "") + (
        f"{fleet.offline_fraction:.0%} offline and {fleet.drop_fraction:.0%} dropping per "
        f"round; simulated clock at {fleet.samples_per_second:g} samples/s, deadline "
        f"{config.strategy.round_timeout:g} s, quarantine {config.strategy.quarantine:g} s")


def with_devices(grid: Grid, config: RunConfig,
                 first_round: int = 1) -> tuple[Grid, Callable[[], float] | None]:
    """``grid`` with the configured device heterogeneity, and its simulated clock; or
    ``grid`` itself and no clock when every device is alike and rounds are synchronous.
    FedBuff always runs on the simulated clock: without rounds, the order in which
    results arrive is the run."""
    fleet = SimulatedFleet.from_config(config)
    if config.strategy.name == "fedbuff":
        devices = AsynchronousDevices(grid, fleet, config.strategy.round_timeout, first_round)
        return devices, devices.clock
    if not fleet.heterogeneous:
        return grid, None
    devices = HeterogeneousGrid(grid, fleet, config.strategy.round_timeout, first_round)
    return devices, devices.clock
