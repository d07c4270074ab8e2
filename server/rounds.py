"""Round bookkeeping: server-side evaluation by the task's measures, the best round by the
monitored one, global early stopping, and each client's own metrics."""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedge.models.measures import SCALARS, improves
from fedge.models.registry import ModelSpec, build_model
from fedge.models.tasks import evaluate_measures
from fedge.protocol import CLIENT_KEY, DEVICES_KEY, WEIGHT_KEY
from fedge.server.grid import RoundStats
from fedge.server.screening import average_client_metrics, client_metrics

VALIDATION_SET = "the server's validation set"  # as warnings name it


class GlobalEarlyStop(Exception):
    """Raised from the evaluation callback to end ``Strategy.start`` early."""


@dataclass(frozen=True)
class RoundRecord:
    """One round as written to metrics.json; ``val_*`` is the server's evaluation of the
    new global model (``val_measures``: every measure of the task, per-class tables
    included), ``client_*`` (and ``train_loss``) the clients' reports, weighted by
    examples, over the clients that report them: None when none of them does."""

    round: int
    train_loss: float | None
    val_loss: float
    val_accuracy: float | None  # None for a task without accuracy (regression)
    num_clients: int
    client_val_loss: float | None
    client_val_accuracy: float | None
    client_epochs: float | None
    clients_stopped_early: float | None
    failures: int
    timeouts: int
    slowest_client_seconds: float | None  # local training time of the slowest client
    seconds: float
    rejected: int = 0  # updates the server's screen kept out of aggregation (0 in older runs)
    simulated_seconds: float | None = None  # the round on a simulation's clock, if it has one
    epsilon: float | None = None  # differential privacy spent so far (at the run's δ), if any
    bytes_per_client: float | None = None  # mean bytes of the arrays a reply sent, if known
    # Which kind of client contributed what: Python clients (`fedge client`, or any Flower
    # client) and ExecuTorch devices behind gateways (:func:`contributions`).
    contributions: dict | None = None
    # Since the run started, at this round's end: simulated seconds if the run has a
    # simulated clock, else wall-clock seconds (None in older runs).
    elapsed_seconds: float | None = None
    val_measures: dict | None = None  # None in runs before tasks
    # Each participating client's own report by its key (partition id in a simulation,
    # node id in a deployment): examples, training loss, local validation measures. None
    # under differential privacy, whose point is that no client's update is singled out.
    clients: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def measured(self, monitor: str) -> float | None:
        """The value of ``monitor`` (``val_loss``, ``val_pr_auc``, ...) in this round."""
        if monitor == "val_loss":
            return self.val_loss
        found = (self.val_measures or {}).get(monitor.removeprefix("val_"))
        return float(found) if isinstance(found, int | float) else None


def server_measures(found: dict, task: str) -> dict[str, float]:
    """The scalar measures of an evaluation as ``val_*`` metrics (the defined ones)."""
    return {f"val_{name}": float(found[name]) for name in SCALARS[task]
            if found.get(name) is not None}


def per_client(replies: list[RecordDict]) -> dict[str, dict]:
    """Each reply's metrics by its client's key (replies without one are left out)."""
    found = {}
    for metrics in map(client_metrics, replies):
        key = metrics.get(CLIENT_KEY)
        if isinstance(key, int):
            found[str(key)] = {"examples": metrics.get(WEIGHT_KEY)} | {
                name: value for name, value in metrics.items()
                if name not in (CLIENT_KEY, DEVICES_KEY, WEIGHT_KEY)
                and isinstance(value, int | float)}
    return found


OnRound = Callable[[RoundRecord, ArrayRecord, bool], None]


def contributions(replies: list[RecordDict], weight_key: str) -> dict:
    """The aggregated replies by kind: ``python`` clients, and ``executorch`` devices
    behind gateways (a gateway's reply counts its devices), with their examples."""
    python = {"clients": 0, "examples": 0}
    edge = {"gateways": 0, "devices": 0, "examples": 0}
    for metrics in map(client_metrics, replies):
        examples = metrics.get(weight_key)
        examples = int(examples) if isinstance(examples, int | float) and math.isfinite(
            examples) else 0
        devices = metrics.get(DEVICES_KEY)
        if isinstance(devices, int | float) and devices > 0:
            edge["gateways"] += 1
            edge["devices"] += int(devices)
            edge["examples"] += examples
        else:
            python["clients"] += 1
            python["examples"] += examples
    return {"python": python, "executorch": edge}


class RoundTracker:
    """Evaluates each new global model by the task's measures and stops the run once the
    ``monitor``ed one (``val_loss`` by default; its direction known per measure) has not
    improved by more than ``min_delta`` for ``patience`` rounds.

    Pass :meth:`aggregate_train_metrics` as the strategy's ``train_metrics_aggr_fn`` and
    :meth:`evaluate` as ``evaluate_fn`` of ``Strategy.start``. ``round_stats`` reports
    the last round's failures and timeouts, ``epsilon`` the privacy spent after it.
    """

    def __init__(self, spec: ModelSpec, val_x: np.ndarray, val_y: np.ndarray, patience: int,
                 min_delta: float, on_round: OnRound,
                 round_stats: Callable[[], RoundStats],
                 epsilon: Callable[[], float | None] = lambda: None,
                 on_initial: Callable[[dict], None] = lambda metrics: None,
                 monitor: str = "val_loss", per_client: bool = True) -> None:
        self.spec, self.val_x, self.val_y = spec, val_x, val_y
        self.monitor, self.per_client = monitor, per_client
        self.patience, self.min_delta = patience, min_delta
        self.on_round, self.round_stats = on_round, round_stats
        self.epsilon, self.on_initial = epsilon, on_initial
        self.history: list[RoundRecord] = []
        self.initial: dict | None = None
        self.best_round: int | None = None
        self.best_value: float | None = None
        self.best_loss: float | None = None  # the best round's, which breaks ties
        self.stopped_early = False
        self._client_metrics: tuple[MetricRecord, int, float | None] | None = None
        self._clients: dict | None = None
        self._contributions: dict | None = None
        self._rejected = 0
        self._bytes_per_client: float | None = None
        self._clock = time.perf_counter()

    @property
    def completed_rounds(self) -> int:
        return self.history[-1].round if self.history else 0

    def resume(self, history: list[dict], initial: dict | None) -> None:
        """Continue after the rounds of an earlier, interrupted run."""
        self.history = [RoundRecord(**r) for r in history]
        self.initial = initial
        for record in self.history:
            if self._improves(record):
                self._best(record)

    def _best(self, record: RoundRecord) -> None:
        self.best_round, self.best_value = record.round, record.measured(self.monitor)
        self.best_loss = record.val_loss

    @property
    def aggregated_rounds(self) -> int:
        """Rounds whose global model took in at least one client update."""
        return sum(record.num_clients > 0 for record in self.history)

    def _improves(self, record: RoundRecord) -> bool:
        # A round that aggregated nothing repeats the previous model: never the best; nor
        # is one whose monitored measure is undefined (a PR-AUC without positives).
        value = record.measured(self.monitor)
        if record.num_clients == 0 or value is None:
            return False
        return improves(self.monitor, value, self.best_value, self.min_delta,
                        record.val_loss, self.best_loss)

    def plateaued(self) -> bool:
        return self.completed_rounds - (self.best_round or 0) >= self.patience

    def aggregate_train_metrics(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Each client metric averaged over the replies that report it (a standard
        Flower client may report none but its weight), the slowest ``train_seconds``."""
        metrics = average_client_metrics(replies, weight_key)
        seconds = [client_metrics(reply).get("train_seconds") for reply in replies]
        slowest = max((float(s) for s in seconds
                       if isinstance(s, int | float) and math.isfinite(s)), default=None)
        self._client_metrics = (metrics, len(replies), slowest)
        self._contributions = contributions(replies, weight_key)
        if self.per_client:  # FedBuff aggregates several times between two evaluations
            self._clients = {**(self._clients or {}), **per_client(replies)}
        return metrics

    def count_rejected(self, rejected: int) -> None:
        """Pass as the update screen's ``on_screened``: this round's rejected replies."""
        self._rejected = rejected

    def count_bytes(self, bytes_per_client: float | None) -> None:
        """Pass as the update decoder's ``on_bytes``: this round's mean bytes per reply."""
        self._bytes_per_client = bytes_per_client

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(self.spec)
        model.load_state_dict(arrays.to_torch_state_dict())
        found = evaluate_measures(model, self.spec, self.val_x, self.val_y,
                                  where=VALIDATION_SET)
        metrics = {"val_loss": found["loss"], **server_measures(found, self.spec.task)}
        if server_round <= self.completed_rounds:  # the starting model, fresh or resumed
            if self.initial is None:
                self.initial = {"round": 0, "val_loss": found["loss"],
                                "val_accuracy": found.get("accuracy"),
                                "val_measures": without_loss(found)}
                self.on_initial(self.initial)
            self._clock = time.perf_counter()
            return MetricRecord(metrics)

        record = self._record(server_round, found)
        self.history.append(record)
        improved = self._improves(record)
        if improved:
            self._best(record)
        self.on_round(record, arrays, improved)
        if self.plateaued():
            self.stopped_early = True
            raise GlobalEarlyStop(f"no improvement for {self.patience} rounds")
        return MetricRecord(metrics)

    def _record(self, server_round: int, found: dict) -> RoundRecord:
        metrics, num_clients, slowest = self._client_metrics or ({}, 0, None)
        shares, self._client_metrics, self._contributions = self._contributions, None, None
        clients, self._clients = self._clients, None
        if clients is not None:
            clients = dict(sorted(clients.items(), key=lambda item: int(item[0])))
        stats = self.round_stats()
        now, started = time.perf_counter(), self._clock
        self._clock = now

        def client(key: str) -> float | None:
            return float(metrics[key]) if key in metrics else None

        before = self.history[-1].elapsed_seconds if self.history else 0.0
        duration = (stats.simulated_seconds if stats.simulated_seconds is not None
                    else now - started)
        return RoundRecord(
            round=server_round, train_loss=client("train_loss"), val_loss=found["loss"],
            val_accuracy=found.get("accuracy"), num_clients=num_clients,
            client_val_loss=client("val_loss"), client_val_accuracy=client("val_accuracy"),
            client_epochs=client("epochs"), clients_stopped_early=client("stopped_early"),
            failures=stats.failures, timeouts=stats.timeouts,
            slowest_client_seconds=slowest, seconds=now - started, rejected=self._rejected,
            simulated_seconds=stats.simulated_seconds, epsilon=self.epsilon(),
            bytes_per_client=self._bytes_per_client, contributions=shares,
            elapsed_seconds=(before or 0.0) + duration, val_measures=without_loss(found),
            clients=clients,
        )


def without_loss(found: dict) -> dict:
    """An evaluation's measures, its loss (kept beside them) left out."""
    return {name: value for name, value in found.items() if name != "loss"}
