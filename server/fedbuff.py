"""FedBuff: asynchronous buffered aggregation (Nguyen et al., AISTATS 2022).

A synchronous round waits for the slowest client it sampled, or for its deadline.
FedBuff has no round barrier:

- the server keeps up to C = ``concurrency`` clients training, each on the model version
  it was sent. A busy client gets no second task; an idle one (a late joiner included)
  gets the current version as soon as a slot is free;
- a result is checked on arrival against the version it trained on: a compressed update
  is decoded, and the update screen's checks 1–3 apply (:mod:`fedge.server.screening`).
  Its staleness τ_i = v − v_i counts the server steps since its copy; a result with
  τ_i > ``max_staleness`` is dropped and counted;
- once K = ``buffer`` results are in, the screen's norm check compares each with the
  median norm of these K and of the last C updates accepted before them (a buffer of a
  few could otherwise be mostly attackers, whose median protects nothing), and the
  server takes one step to model version v + 1:

      w_{v+1} = w_v + η_g · (1/K') · Σ_i s(τ_i) · Δ_i,    Δ_i = w_i − w_{v_i},
      s(τ) = 1/√(1 + τ)

  (η_g = ``server_lr``; K' the results that passed the norm check: K unless some did not);
- every ``eval_every`` versions, and after the last, ``evaluate_fn(version, arrays)``
  evaluates, checkpoints and may stop the run, as in Flower's strategies.

A client that fails, or is still training ``timeout`` seconds after it was sent its task,
frees its slot, is counted, and is not sampled for a while (:meth:`RoundGrid.suspend`).
Versions take the place of rounds: ``start``'s ``num_rounds`` bounds them.

Flower's strategies wait for whole rounds in ``send_and_receive``; this one is built on
the Grid's ``push_messages`` and ``pull_messages``. Over a network a pull returns what has
arrived and the server polls; a simulation's grid returns the next results on its
simulated clock at once (:class:`fedge.simulations.heterogeneity.AsynchronousDevices`).
"""

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedge.config import RunConfig, StrategySettings, default, server_learning_rate
from fedge.errors import FedgeError
from fedge.models.exchange import exchanged_names
from fedge.protocol import ARRAYS, COMPRESSION_RECORD, CONFIG, SEED, SERVER_ROUND, WEIGHT_KEY
from fedge.server.compression import decoded_content, sent_bytes
from fedge.server.grid import MISSED_DEADLINE, RoundGrid, RoundStats
from fedge.server.privacy import clients_per_round
from fedge.server.screening import (
    norm_outliers,
    screen_replies,
    uniform_content,
)

log = logging.getLogger("fedge.server")

STALENESS_WEIGHT = "1/sqrt(1+staleness)"
# Tasks in a row, per slot, that may end without a usable result before the run stops.
FRUITLESS_TASKS_PER_SLOT = 10
FEDBUFF_ONLY = ("concurrency", "buffer", "max_staleness", "eval_every")
MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


@dataclass(frozen=True)
class BufferSettings:
    """FedBuff's settings: C, K, η_g, the staleness limit and how often to evaluate."""

    concurrency: int
    buffer: int
    server_lr: float = 1.0
    max_staleness: int | None = None
    eval_every: int = 1

    @classmethod
    def from_strategy(cls, strategy: StrategySettings) -> "BufferSettings":
        """Defaults: C the clients a FedAvg round samples, K = ⌈C/2⌉, and an evaluation
        every ⌈C/K⌉ versions (about a round's worth of updates)."""
        concurrency = strategy.concurrency or clients_per_round(strategy)
        buffer = strategy.buffer or math.ceil(concurrency / 2)
        return cls(concurrency, buffer, server_learning_rate(strategy), strategy.max_staleness,
                   strategy.eval_every or math.ceil(concurrency / buffer))


def check_fedbuff(config: RunConfig) -> None:
    """FedBuff's settings fit together, and fedbuff's flags are not given without it."""
    if config.strategy.name != "fedbuff":
        given = [name for name in FEDBUFF_ONLY if getattr(config.strategy, name) is not None]
        if given:
            raise FedgeError(f"--{given[0].replace('_', '-')} is a setting of --strategy "
                             f"fedbuff, not of {config.strategy.name}")
        return
    if config.privacy.secagg:
        raise FedgeError("--strategy fedbuff cannot be combined with --secagg: SecAgg+ "
                         "unmasks only the sum of one round's clients, and FedBuff has no "
                         "rounds; use fedavg or fedprox")
    if config.privacy.dp_clip_norm is not None:
        raise FedgeError("--strategy fedbuff cannot be combined with differential privacy: "
                         "the accountant counts rounds of a fixed number of sampled "
                         "clients, which FedBuff does not have; use fedavg or fedprox")
    settings = BufferSettings.from_strategy(config.strategy)
    if settings.buffer > settings.concurrency:
        raise FedgeError(f"--buffer {settings.buffer} is larger than --concurrency "
                         f"{settings.concurrency}: every server step would wait for more "
                         "results than there are clients training")


def staleness_weight(staleness: int) -> float:
    """s(τ) = 1/√(1 + τ): an update from a copy τ versions old counts that much less."""
    return 1.0 / math.sqrt(1.0 + staleness)


def buffered_step(current: dict[str, np.ndarray],
                  updates: Sequence[tuple[dict[str, np.ndarray], int]],
                  server_lr: float) -> dict[str, np.ndarray]:
    """``w + η_g · (1/K') Σ_i s(τ_i) · Δ_i`` for ``updates`` (Δ_i, τ_i); entries no update
    carries (frozen, integer) keep their values. Summed in float64, in the given order."""
    stepped = dict(current)
    for name in updates[0][0]:
        total = sum(staleness_weight(tau) * delta[name] for delta, tau in updates)
        step = server_lr * total / len(updates)
        stepped[name] = (current[name].astype(np.float64) + step).astype(current[name].dtype)
    return stepped


@dataclass(frozen=True)
class VersionRecord:
    """One server step as written to metrics.json's ``versions``; the counts are of
    what happened since the previous version."""

    version: int
    updates: int  # results in the step
    staleness: list[int]  # τ of each, in the order they arrived
    nodes: list[int]  # the node each came from
    clients_busy: int  # clients training when the step was taken
    dropped_stale: int  # results older than max_staleness
    rejected: int  # results the update screen refused
    failures: int
    timeouts: int
    elapsed_seconds: float  # since the run started, on its clock (simulated in simulation)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Task:
    node: int
    version: int
    sent: float  # on the run's clock


@dataclass(frozen=True)
class _Update:
    node: int
    staleness: int
    delta: dict[str, np.ndarray]
    content: RecordDict


@dataclass
class _Counts:
    """What happened since some moment: results, failures, drops, rejections, bytes."""

    sent: int = 0
    failures: int = 0
    timeouts: int = 0
    dropped_stale: int = 0
    rejected: int = 0
    replies: list[RecordDict] = field(default_factory=list)
    sent_bytes: list[int] = field(default_factory=list)


class FedBuff:
    """Asynchronous buffered aggregation with :class:`BufferSettings` (see the module
    docstring). ``start`` has the signature of Flower's ``Strategy.start``.

    Before each evaluation the updates used since the last one are handed to
    ``train_metrics_aggr_fn`` (as a round's replies), their rejections to
    ``on_screened`` and their mean bytes to ``on_bytes``; :meth:`interval_stats` gives
    that interval's failures, timeouts and simulated seconds. ``clock``: a simulation's
    simulated seconds (default: wall-clock time). ``min_nodes``: no task is sent while
    fewer clients are connected. ``frozen``: entries the clients neither train nor send.
    """

    def __init__(self, settings: BufferSettings, *, train_metrics_aggr_fn: MetricsAggregator,
                 max_norm_ratio: float = default("max_norm_ratio"), frozen: Sequence[str] = (),
                 on_screened: Callable[[int], None] = lambda rejected: None,
                 on_bytes: Callable[[float | None], None] = lambda mean: None,
                 clock: Callable[[], float] | None = None, min_nodes: int = 1,
                 poll_interval: float = default("poll_interval"), seed: int = 0) -> None:
        self.settings = settings
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.max_norm_ratio, self.frozen = max_norm_ratio, frozenset(frozen)
        self.on_screened, self.on_bytes = on_screened, on_bytes
        self.simulated = clock is not None
        self.clock = clock or time.monotonic
        self.min_nodes, self.poll_interval, self.seed = min_nodes, poll_interval, seed
        self.version = 0
        self.versions: list[VersionRecord] = []
        self.discarded_at_resume = 0  # results in flight when the run was interrupted
        self._tasks_sent = 0
        self._tasks: dict[str, _Task] = {}  # message id → task
        self._bases: dict[int, dict[str, np.ndarray]] = {}  # version → its exchanged arrays
        self._buffer: list[_Update] = []
        self._accepted_norms: deque[float] = deque(maxlen=settings.concurrency)
        self._since_version, self._since_evaluation = _Counts(), _Counts()
        self._elapsed_before = 0.0  # elapsed seconds of the run before this start
        self._started = self._evaluated_at = 0.0

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Run ``num_rounds`` more server steps (model versions) on ``grid``; the server
        evaluates in ``evaluate_fn``, so ``evaluate_config`` is not used."""
        train_config = ConfigRecord() if train_config is None else train_config
        self._begin(initial_arrays)
        result = Result()
        if evaluate_fn:
            result.evaluate_metrics_serverapp[self.version] = evaluate_fn(
                self.version, initial_arrays)
        last = self.version + num_rounds
        while self.version < last:
            self._dispatch(grid, train_config)
            replies = list(grid.pull_messages(list(self._tasks)))
            if not replies:
                self._expire(grid, timeout)
                time.sleep(self.poll_interval)
                continue
            for reply in replies:
                self._receive(grid, reply)
                if len(self._buffer) < self.settings.buffer or not self._step():
                    continue
                if self.version % self.settings.eval_every == 0 or self.version == last:
                    self._evaluate(evaluate_fn, result)
                if self.version == last:
                    break
            self._expire(grid, timeout)
        result.arrays = self._record
        return result

    def _begin(self, arrays: ArrayRecord) -> None:
        self._arrays = {name: array.numpy() for name, array in arrays.items()}
        self._record = arrays
        self._exchanged = exchanged_names(
            {name: array.dtype for name, array in arrays.items()}, self.frozen)
        self._bases = {self.version: self._exchanged_arrays()}
        self._started = self._evaluated_at = self.clock()
        self._elapsed_before = self.versions[-1].elapsed_seconds if self.versions else 0.0
        self._rng = random.Random(f"{self.seed}:{self.version}")  # who gets a task

    def _exchanged_arrays(self) -> dict[str, np.ndarray]:
        return {name: self._arrays[name] for name in self._exchanged}

    def _elapsed(self) -> float:
        return self._elapsed_before + self.clock() - self._started

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Train messages of model version ``server_round`` for the idle clients that fill
        the free slots, chosen at random (none while fewer than ``min_nodes`` are
        connected)."""
        nodes = list(grid.get_node_ids())
        busy = {task.node for task in self._tasks.values()}
        idle = sorted(node for node in nodes if node not in busy)
        free = self.settings.concurrency - len(busy)
        if len(nodes) < self.min_nodes or free <= 0 or not idle:
            return []
        return [Message(content=RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({
                            **config, SERVER_ROUND: server_round,
                            SEED: self._task_seed()})}),
                        message_type=MessageType.TRAIN, dst_node_id=node,
                        group_id=str(server_round))
                for node in self._rng.sample(idle, min(free, len(idle)))]

    def _task_seed(self) -> int:
        """Clients seed their batches and dropout from the config's seed, round and node:
        a seed of its own for every task keeps a client that gets the same version twice
        from training the same way twice (and sending the same update)."""
        self._tasks_sent += 1
        state = np.random.SeedSequence([self.seed, self._tasks_sent]).generate_state(1)
        return int(state[0])

    def _dispatch(self, grid: Grid, config: ConfigRecord) -> None:
        messages = self.configure_train(self.version, self._record, config, grid)
        if not messages:
            return
        sent = self.clock()
        for message_id, message in zip(grid.push_messages(messages), messages, strict=True):
            if message_id is None:
                log.warning("could not send a task to client node %d",
                            message.metadata.dst_node_id)
                self._count("failures")
                continue
            self._tasks[message_id] = _Task(message.metadata.dst_node_id, self.version, sent)
            self._since_evaluation.sent += 1

    def _receive(self, grid: Grid, reply: Message) -> None:
        task = self._tasks.pop(reply.metadata.reply_to_message_id, None)
        if task is None:  # the result of a task that timed out before
            return
        base = self._bases[task.version]
        self._forget_unused_bases()
        if reply.has_error():
            late = reply.error.code == MISSED_DEADLINE
            log.warning("client node %d %s: %s", task.node,
                        "missed its deadline" if late else "failed", reply.error.reason)
            self._count("timeouts" if late else "failures")
            _suspend(grid, task.node)
            return
        staleness = self.version - task.version
        limit = self.settings.max_staleness
        if limit is not None and staleness > limit:
            log.info("dropped the result of client node %d: trained on version %d, %d "
                     "versions old (max_staleness %d)", task.node, task.version, staleness,
                     limit)
            self._count("dropped_stale")
            return
        self._since_evaluation.sent_bytes.append(sent_bytes(reply))
        if COMPRESSION_RECORD in reply.content:
            reply.content = decoded_content(reply, base)
        _, rejections = screen_replies(base, [reply], 0.0)
        if rejections:
            self._reject(task.node, rejections[0].reason)
            return
        content = uniform_content(reply.content, (WEIGHT_KEY,))
        delta = {name: content[ARRAYS][name].numpy().astype(np.float64) - value
                 for name, value in base.items()}
        self._buffer.append(_Update(task.node, staleness, delta, content))

    def _step(self) -> bool:
        """One server step from the buffer; False if the norm check refused all of it."""
        updates, self._buffer = self._buffer, []
        norms = {i: math.sqrt(sum(float(np.sum(d * d)) for d in u.delta.values()))
                 for i, u in enumerate(updates)}
        refused = norm_outliers(norms, self.max_norm_ratio, self._accepted_norms,
                                over="the recent updates'")
        for position, reason in refused.items():
            self._reject(updates[position].node, reason)
        kept = [u for i, u in enumerate(updates) if i not in refused]
        self._accepted_norms.extend(norms[i] for i in range(len(updates)) if i not in refused)
        if not kept:
            return False
        self._arrays = buffered_step(self._arrays, [(u.delta, u.staleness) for u in kept],
                                     self.settings.server_lr)
        self._record = ArrayRecord(array_dict={name: Array(value)
                                               for name, value in self._arrays.items()})
        self.version += 1
        self._bases[self.version] = self._exchanged_arrays()
        counts, self._since_version = self._since_version, _Counts()
        self.versions.append(VersionRecord(
            version=self.version, updates=len(kept), staleness=[u.staleness for u in kept],
            nodes=[u.node for u in kept], clients_busy=len(self._tasks),
            dropped_stale=counts.dropped_stale, rejected=counts.rejected,
            failures=counts.failures, timeouts=counts.timeouts,
            elapsed_seconds=self._elapsed()))
        self._since_evaluation.replies += [u.content for u in kept]
        self._forget_unused_bases()
        return True

    def _evaluate(self, evaluate_fn: Callable | None, result: Result) -> None:
        interval = self._since_evaluation
        self.train_metrics_aggr_fn(interval.replies, WEIGHT_KEY)
        self.on_screened(interval.rejected)
        self.on_bytes(float(np.mean(interval.sent_bytes)) if interval.sent_bytes else None)
        if evaluate_fn:
            result.evaluate_metrics_serverapp[self.version] = evaluate_fn(
                self.version, self._record)
        self._since_evaluation, self._evaluated_at = _Counts(), self.clock()

    def interval_stats(self) -> RoundStats:
        """Since the last evaluation: tasks sent, results used, failures, timeouts, and
        the simulated seconds (None on a wall clock)."""
        interval = self._since_evaluation
        return RoundStats(
            sent=interval.sent, replies=len(interval.replies), failures=interval.failures,
            timeouts=interval.timeouts,
            simulated_seconds=self.clock() - self._evaluated_at if self.simulated else None)

    def _expire(self, grid: Grid, timeout: float) -> None:
        """Free the slots of tasks older than ``timeout``: their results come too late."""
        now = self.clock()
        for message_id, task in list(self._tasks.items()):
            if now - task.sent > timeout:
                del self._tasks[message_id]
                log.warning("client node %d did not answer within %.0f s", task.node, timeout)
                self._count("timeouts")
                _suspend(grid, task.node)
        self._forget_unused_bases()

    def _reject(self, node: int, reason: str) -> None:
        log.warning("version %d: rejected the update of client node %d: %s",
                    self.version + 1, node, reason)
        self._count("rejected")

    def _count(self, what: str) -> None:
        for counts in (self._since_version, self._since_evaluation):
            setattr(counts, what, getattr(counts, what) + 1)
        self._check_progress()

    def _check_progress(self) -> None:
        """Stop a run whose tasks keep ending without a result it can use."""
        c = self._since_version
        fruitless = c.failures + c.timeouts + c.dropped_stale + c.rejected
        if fruitless >= FRUITLESS_TASKS_PER_SLOT * self.settings.concurrency:
            raise FedgeError(
                f"the last {fruitless} client tasks after version {self.version} brought no "
                f"usable result ({c.failures} failed, {c.timeouts} timed out, "
                f"{c.rejected} rejected, {c.dropped_stale} too stale); the run stops, and "
                "its last checkpoint can be resumed")

    def _forget_unused_bases(self) -> None:
        used = {task.version for task in self._tasks.values()} | {self.version}
        self._bases = {v: arrays for v, arrays in self._bases.items() if v in used}

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the version, every version's record, the results in
        flight now (lost if the run is interrupted)."""
        return {"version": self.version, "versions": [r.as_dict() for r in self.versions],
                "in_flight": len(self._tasks), "tasks_sent": self._tasks_sent,
                "discarded_at_resume": self.discarded_at_resume}

    def load_state_dict(self, state: dict) -> None:
        """Continue after a checkpoint: the results in flight then are lost, and counted."""
        self.version = state["version"]
        self.versions = [VersionRecord(**r) for r in state["versions"]]
        self._tasks_sent = state["tasks_sent"]
        self.discarded_at_resume = state["discarded_at_resume"] + state["in_flight"]
        log.info("resuming after version %d: the %d results in flight at its checkpoint "
                 "are discarded", self.version, state["in_flight"])

    def report(self) -> dict:
        """FedBuff's settings and what its versions did, for metrics.json."""
        return {
            "strategy": "fedbuff", **asdict(self.settings),
            "staleness_weight": STALENESS_WEIGHT,
            "clock": "simulated" if self.simulated else "wall",
            "dropped_stale": sum(r.dropped_stale for r in self.versions),
            "discarded_at_resume": self.discarded_at_resume,
            "in_flight": len(self._tasks),
        }


def _suspend(grid: Grid, node: int) -> None:
    if isinstance(grid, RoundGrid):
        grid.suspend(node)
