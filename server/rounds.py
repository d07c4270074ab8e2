"""Round bookkeeping: server-side evaluation, the best round, global early stopping."""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import ModelSpec, build_model
from fedge.protocol import DEVICES_KEY
from fedge.server.grid import RoundStats
from fedge.server.screening import average_client_metrics, client_metrics


class GlobalEarlyStop(Exception):
    """Raised from the evaluation callback to end ``Strategy.start`` early."""


@dataclass(frozen=True)
class RoundRecord:
    """One round as written to metrics.json; ``val_*`` is the server's evaluation of the
    new global model, ``client_*`` (and ``train_loss``) the clients' reports, weighted by
    examples, over the clients that report them: None when none of them does."""

    round: int
    train_loss: float | None
    val_loss: float
    val_accuracy: float
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

    def as_dict(self) -> dict:
        return asdict(self)


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
    """Evaluates each new global model and stops the run once validation loss has not
    improved by more than ``min_delta`` for ``patience`` rounds.

    Pass :meth:`aggregate_train_metrics` as the strategy's ``train_metrics_aggr_fn`` and
    :meth:`evaluate` as ``evaluate_fn`` of ``Strategy.start``. ``round_stats`` reports
    the last round's failures and timeouts, ``epsilon`` the privacy spent after it.
    """

    def __init__(self, spec: ModelSpec, val_x: np.ndarray, val_y: np.ndarray, patience: int,
                 min_delta: float, on_round: OnRound,
                 round_stats: Callable[[], RoundStats],
                 epsilon: Callable[[], float | None] = lambda: None,
                 on_initial: Callable[[dict], None] = lambda metrics: None) -> None:
        self.spec, self.val_x, self.val_y = spec, val_x, val_y
        self.patience, self.min_delta = patience, min_delta
        self.on_round, self.round_stats = on_round, round_stats
        self.epsilon, self.on_initial = epsilon, on_initial
        self.history: list[RoundRecord] = []
        self.initial: dict | None = None
        self.best_round: int | None = None
        self.best_val_loss = math.inf
        self.stopped_early = False
        self._client_metrics: tuple[MetricRecord, int, float | None] | None = None
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
                self.best_round, self.best_val_loss = record.round, record.val_loss

    @property
    def aggregated_rounds(self) -> int:
        """Rounds whose global model took in at least one client update."""
        return sum(record.num_clients > 0 for record in self.history)

    def _improves(self, record: RoundRecord) -> bool:
        # A round that aggregated nothing repeats the previous model: never the best.
        return record.num_clients > 0 and record.val_loss < self.best_val_loss - self.min_delta

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
        val_loss, val_accuracy = evaluate_classifier(model, self.spec, self.val_x, self.val_y)
        metrics = {"val_loss": val_loss, "val_accuracy": val_accuracy}
        if server_round <= self.completed_rounds:  # the starting model, fresh or resumed
            if self.initial is None:
                self.initial = {"round": 0, **metrics}
                self.on_initial(self.initial)
            self._clock = time.perf_counter()
            return MetricRecord(metrics)

        record = self._record(server_round, val_loss, val_accuracy)
        self.history.append(record)
        improved = self._improves(record)
        if improved:
            self.best_round, self.best_val_loss = server_round, val_loss
        self.on_round(record, arrays, improved)
        if self.plateaued():
            self.stopped_early = True
            raise GlobalEarlyStop(f"no improvement for {self.patience} rounds")
        return MetricRecord(metrics)

    def _record(self, server_round: int, val_loss: float, val_accuracy: float) -> RoundRecord:
        metrics, num_clients, slowest = self._client_metrics or ({}, 0, None)
        shares, self._client_metrics, self._contributions = self._contributions, None, None
        stats = self.round_stats()
        now, started = time.perf_counter(), self._clock
        self._clock = now

        def client(key: str) -> float | None:
            return float(metrics[key]) if key in metrics else None

        before = self.history[-1].elapsed_seconds if self.history else 0.0
        duration = (stats.simulated_seconds if stats.simulated_seconds is not None
                    else now - started)
        return RoundRecord(
            round=server_round, train_loss=client("train_loss"), val_loss=val_loss,
            val_accuracy=val_accuracy, num_clients=num_clients,
            client_val_loss=client("val_loss"), client_val_accuracy=client("val_accuracy"),
            client_epochs=client("epochs"), clients_stopped_early=client("stopped_early"),
            failures=stats.failures, timeouts=stats.timeouts,
            slowest_client_seconds=slowest, seconds=now - started, rejected=self._rejected,
            simulated_seconds=stats.simulated_seconds, epsilon=self.epsilon(),
            bytes_per_client=self._bytes_per_client, contributions=shares,
            elapsed_seconds=(before or 0.0) + duration,
        )
