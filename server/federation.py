"""The Flower ServerApp: rounds through a Flower strategy, checkpoints, ONNX export."""

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.models.export import export_onnx
from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import build_model, spec_from_data
from fedge.server.checkpoint import Checkpoint
from fedge.server.rounds import GlobalEarlyStop, RoundRecord, RoundTracker
from fedge.server.run_folder import plot_curves, write_json
from fedge.server.strategies import build_strategy, strategy_state

log = logging.getLogger("fedge.server")

REFERENCE_SAMPLES = 64  # held-out inputs kept in checkpoints to verify later exports


@dataclass(frozen=True)
class ServerData:
    """Samples only the server holds: validation (early stopping, best round) and test."""

    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    vocab_size: int | None = None


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    rounds_run: int
    best_round: int
    stopped_early: bool
    test_loss: float
    test_accuracy: float
    onnx_report: dict


class Federation:
    """One federated run of ``config`` that writes its run folder ``run_dir``.

    ``on_round(record, improved)`` is called after every round, once it is checkpointed.

    :meth:`server_app` wraps :meth:`run` as a Flower ServerApp for any Grid: Flower's
    simulation engine, the Deployment Engine, or fedge's in-process grid.
    """

    def __init__(self, config: RunConfig, data: ServerData, run_dir: Path,
                 on_round: Callable[[RoundRecord, bool], None] | None = None) -> None:
        if config.model is None:
            raise FedgeError("the server needs a model name")
        self.config, self.data, self.run_dir = config, data, run_dir
        self.on_round = on_round
        self.spec = spec_from_data(config.model, data.val_x, data.num_classes, config.dropout,
                                   vocab_size=data.vocab_size)
        self.outcome: RunOutcome | None = None

    def server_app(self) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.run(grid)

        return app

    def run(self, grid: Grid) -> RunOutcome:
        config = self.config
        torch.manual_seed(config.seed)
        # Flower samples clients with the global `random` module.
        random.seed(config.seed)
        model = build_model(self.spec)
        tracker = RoundTracker(self.spec, self.data.val_x, self.data.val_y, config.patience,
                               config.min_delta, on_round=self._save_round)
        self._tracker = tracker
        self._strategy = build_strategy(config, tracker.aggregate_train_metrics)
        self._best_state: dict[str, torch.Tensor] | None = None
        started = time.perf_counter()
        try:
            self._strategy.start(
                grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=config.rounds, timeout=config.round_timeout,
                train_config=self._train_config(), evaluate_fn=tracker.evaluate,
            )
        except GlobalEarlyStop as stop:
            log.info("global early stopping after round %d: %s", tracker.history[-1].round, stop)
        if self._best_state is None:
            raise FedgeError("no round completed: no client returned an update")
        self.outcome = self._finish(time.perf_counter() - started)
        return self.outcome

    def _train_config(self) -> ConfigRecord:
        c = self.config
        return ConfigRecord({
            "model-spec": self.spec.to_json(), "local-epochs": c.local_epochs,
            "batch-size": c.batch_size, "lr": c.lr, "optimizer": c.optimizer,
            "local-patience": c.local_patience, "seed": c.seed,
        })

    def _checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> Checkpoint:
        return Checkpoint(
            round=server_round, state_dict=state, model_spec=self.spec,
            config=self.config.model_dump(),
            reference_inputs=torch.as_tensor(self.data.val_x[:REFERENCE_SAMPLES]),
            history=[r.as_dict() for r in self._tracker.history],
            best_round=self._tracker.best_round,
            strategy_state=strategy_state(self._strategy),
        )

    def _save_round(self, record: RoundRecord, arrays: ArrayRecord, improved: bool) -> None:
        state = arrays.to_torch_state_dict()
        checkpoint = self._checkpoint(record.round, state)
        checkpoint.save(self.run_dir / "checkpoint.pt")
        if improved:
            self._best_state = state
            checkpoint.save(self.run_dir / "best.pt")
        write_json(self.run_dir / "metrics.json", self._metrics(status="running"))
        log.info("round %d: val_loss %.4f val_accuracy %.4f (%d clients, %.2fs)",
                 record.round, record.val_loss, record.val_accuracy, record.num_clients,
                 record.seconds)
        if self.on_round:
            self.on_round(record, improved)

    def _metrics(self, status: str, **extra: object) -> dict:
        tracker = self._tracker
        return {
            "status": status,
            "config": self.config.model_dump(),
            "model_spec": self.spec.model_dump(mode="json"),
            "initial": tracker.initial,
            "rounds": [r.as_dict() for r in tracker.history],
            "best_round": tracker.best_round,
            "stopped_early": tracker.stopped_early,
            **extra,
        }

    def _finish(self, seconds: float) -> RunOutcome:
        tracker, data = self._tracker, self.data
        model = build_model(self.spec)
        model.load_state_dict(self._best_state)
        test_loss, test_accuracy = evaluate_classifier(model, self.spec, data.test_x, data.test_y)
        report = export_onnx(model, self.spec, data.test_x, self.run_dir / "model.onnx")
        report["best_round"] = tracker.best_round
        write_json(self.run_dir / "onnx_report.json", report)
        plot_curves(self.run_dir / "curves.png", [r.as_dict() for r in tracker.history],
                    tracker.best_round)
        write_json(self.run_dir / "metrics.json", self._metrics(
            status="finished",
            test={"loss": test_loss, "accuracy": test_accuracy, "samples": len(data.test_y),
                  "round": tracker.best_round},
            seconds=seconds,
        ))
        return RunOutcome(self.run_dir, len(tracker.history), tracker.best_round,
                          tracker.stopped_early, test_loss, test_accuracy, report)

