"""The Flower ServerApp: rounds through a Flower strategy, checkpoints, ONNX export."""

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.config import (
    DEFAULT_DATASET,
    RunConfig,
    default_server_lr,
    flat_settings,
    step_name,
)
from fedge.errors import FedgeError
from fedge.files import write_json
from fedge.models.edge import check_edge_task, write_edge_folder
from fedge.models.export import export_onnx
from fedge.models.hf import check_pretrained_settings
from fedge.models.measures import HEADLINE, choose_threshold, warn_lacking
from fedge.models.registry import ModelSpec, build_model
from fedge.models.tasks import check_task_settings, evaluate, evaluate_measures
from fedge.protocol import (
    EDGE_MANIFEST_KEY,
    EDGE_PREDICT_KEY,
    EDGE_TRAIN_KEY,
    EXPECTED_CLIENT_KEY,
    FROZEN_KEY,
    MODEL_SPEC,
    MONITOR,
    PROGRAM_KEY,
    SEED,
)
from fedge.server.checkpoint import Checkpoint, load_checkpoint
from fedge.server.compression import DecodeUpdates, check_compression
from fedge.server.fedbuff import BufferSettings, FedBuff, check_fedbuff
from fedge.server.grid import RoundGrid, RoundStats
from fedge.server.observers import ObservedGrid, Observers, RunObserver, RunStart
from fedge.server.partial import PartialUpdates, has_fixed_entries
from fedge.server.privacy import (
    check_privacy,
    epsilon_spent,
    min_round_clients,
    privacy_report,
)
from fedge.server.rounds import VALIDATION_SET, GlobalEarlyStop, RoundRecord, RoundTracker
from fedge.server.run_folder import plot_curves, run_failure
from fedge.server.screening import EXPECTED_CLIENT, UpdateScreen
from fedge.server.secagg import check_secagg, run_secure_rounds, secure_round_stats
from fedge.server.starting_model import StartingModel, starting_model
from fedge.server.strategies import (
    ContinuedRounds,
    build_strategy,
    check_strategy,
    restore_strategy_state,
    strategy_state,
)
from fedge.server.tracking import component_versions, open_trackers
from fedge.tracking import check_targets

log = logging.getLogger("fedge.server")

EDGE_FOLDER = "edge"  # the run folder's device programs (fedge.models.edge)
TEST_SET = "the server's test set"  # as warnings name it
REFERENCE_SAMPLES = 64  # held-out inputs kept in checkpoints to verify later exports
# Settings a resumed run may change; any other difference means a different run.
RESUMABLE_CHANGES = {"rounds", "round_timeout", "join_timeout", "min_results", "backend",
                     "device", "poll_interval", "quarantine", "max_norm_ratio",
                     "workers", "vectorize", "ray_address", "client_cpus", "client_gpus",
                     "track", "track_timeout"}


@dataclass(frozen=True)
class ServerData:
    """Samples only the server holds: validation (early stopping, best round) and test."""

    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    vocab_size: int | None = None
    class_names: tuple[str, ...] | None = None  # label names in class-id order, if named
    source: str | None = None  # what the samples are, as the console's first line says
    non_feature_columns: tuple[str, ...] = ()  # CSV columns of the run's files, not features


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    rounds_run: int
    best_round: int
    stopped_early: bool
    test_loss: float
    test_accuracy: float | None  # None for a task without accuracy (regression)
    onnx_report: dict
    privacy: dict | None = None  # the run's differential privacy, ε included, if any
    test: dict | None = None  # every measure of the task on the test set, loss included


def check_server_settings(config: RunConfig) -> None:
    """Strategy, privacy, secure-aggregation and compression settings the server cannot
    run with: one clear error, found before any file is written."""
    check_fedbuff(config)  # first: it names what FedBuff cannot be combined with
    check_task_settings(config.task)
    check_pretrained_settings(config.model, config.devices.edge_programs)
    if config.devices.edge_programs:
        check_edge_task(config.task.name)
    check_privacy(config)
    check_secagg(config)
    check_compression(config)
    check_strategy(config.strategy)  # last: a strategy that cannot be used at all is said first
    check_targets(config.tracking.track)


class Federation:
    """One federated run of ``config`` that writes its run folder ``run_dir``.

    :meth:`server_app` wraps :meth:`run` as a Flower ServerApp for any Grid: Flower's
    simulation engine, the Deployment Engine, or fedge's in-process grid. With
    ``resume``, the run continues after that checkpoint's round.
    ``on_round(record, improved)`` is called after every round, once it is checkpointed,
    ``on_start(metrics)`` with the starting model's validation metrics (round 0).
    ``start`` is the starting model if the caller prepared it already (:func:`prepare`).
    ``observers`` hear the run as it goes (:mod:`fedge.server.observers`), besides the
    trackers of the run's ``[tracking]`` settings, which :meth:`run` opens.
    """

    def __init__(self, config: RunConfig, data: ServerData, run_dir: Path,
                 on_round: Callable[[RoundRecord, bool], None] | None = None,
                 resume: Checkpoint | None = None, start: StartingModel | None = None,
                 on_start: Callable[[dict], None] | None = None,
                 observers: Sequence[RunObserver] = (), command: str = "simulate") -> None:
        check_server_settings(config)
        start = start or prepare(config, data)
        if resume is not None:
            _check_resumable(config, resume)
            _check_same_model(start, resume)
            resume.model()  # its weights fit its model, or a clear error now
        self.config, self.data, self.run_dir = config, data, run_dir
        self.on_round, self.resume, self.start = on_round, resume, start
        self.on_start = on_start
        self.observers = Observers(observers)
        self.command = command
        # A resumed run keeps its model definition, input scaling included.
        self.spec = resume.model_spec if resume else start.spec
        self.outcome: RunOutcome | None = None

    def _with_partial_updates(self, strategy: Strategy, arrays: ArrayRecord) -> Strategy:
        """Frozen and integer entries stay out of the clients' updates."""
        if has_fixed_entries(arrays, self.start.frozen):
            return PartialUpdates(strategy, self.start.frozen)
        return strategy

    def run(self, flower_grid: Grid, clock: Callable[[], float] | None = None) -> RunOutcome:
        """The whole run on ``flower_grid``; a simulation passes its simulated ``clock``."""
        self.observers = Observers([*self.observers.observers,
                                    *open_trackers(self.config.tracking, self.run_dir)])
        self.observers.phase("starting")
        try:
            return self._run(ObservedGrid(flower_grid, self.observers,
                                          self.config.strategy.min_clients), clock)
        except FedgeError as error:
            self.observers.ended("failed" if run_failure(self.run_dir) else "interrupted",
                                 str(error))
            raise
        except BaseException as error:
            self.observers.ended("interrupted", f"{type(error).__name__}: {error}")
            raise
        finally:
            self.observers.close()

    def _run(self, flower_grid: Grid, clock: Callable[[], float] | None) -> RunOutcome:
        config = self.config
        torch.manual_seed(config.seed)
        # Flower samples clients with the global `random` module, and SecAgg+'s client mod
        # rounds stochastically with numpy's (clients in this process: a simulation).
        random.seed(config.seed)
        np.random.seed(config.seed)
        grid = RoundGrid(flower_grid, min_nodes=min_round_clients(config),
                         min_replies=config.strategy.min_results,
                         join_timeout=config.strategy.join_timeout,
                         poll_interval=config.strategy.poll_interval, clock=clock,
                         quarantine=config.strategy.quarantine)
        buffered = (BufferSettings.from_strategy(config.strategy)
                    if config.strategy.name == "fedbuff" else None)
        self._tracker = RoundTracker(
            self.spec, self.data.val_x, self.data.val_y,
            # FedBuff's patience counts evaluations, one every eval_every versions.
            config.strategy.patience * (buffered.eval_every if buffered else 1),
            config.strategy.min_delta, on_round=self._save_round,
            round_stats=self._round_stats(grid), epsilon=lambda: epsilon_spent(self._strategy),
            on_initial=self._started, monitor=config.task.monitor,
            per_client=config.privacy.dp_clip_norm is None)
        self._strategy = (self._buffered(buffered, clock) if buffered else
                          build_strategy(config, self._tracker.aggregate_train_metrics))
        started = time.perf_counter()
        self._reported_versions = 0
        self.observers.started(self._run_start())
        self._name_lacking_classes()
        if self.start.edge is not None:
            write_edge_folder(self.start.edge, self.run_dir / EDGE_FOLDER)
        strategy, arrays = self._starting_point()
        if not buffered:
            strategy = self._screened(strategy, arrays)
        remaining = config.strategy.rounds - self._tracker.completed_rounds
        if remaining > 0 and not self._tracker.plateaued():
            self._rounds(strategy, grid, arrays, remaining)
        self._tracker.stopped_early = self._tracker.plateaued()
        if self._best_state is None:
            self._fail(self._nothing_to_export(grid.last_failure))
        self.outcome = self._finish(time.perf_counter() - started)
        return self.outcome

    def _name_lacking_classes(self) -> None:
        """Warn, as the run starts, of each class the server's validation or test set has
        no sample of: the measures that need it are null, and the best round is chosen
        blind to it. Clients lacking a class are normal."""
        spec = self.spec
        for where, y in ((VALIDATION_SET, self.data.val_y), (TEST_SET, self.data.test_y)):
            warn_lacking(where, spec.task, y, spec.class_names, spec.num_classes)

    def _nothing_to_export(self, last_failure: str | None) -> str:
        """Why no round gave a model worth exporting, in one line."""
        history = self._tracker.history
        if not history:
            return "no round completed: no client returned an update"
        if self._tracker.aggregated_rounds == 0:
            failures = sum(r.failures for r in history)
            timeouts = sum(r.timeouts for r in history)
            rejected = sum(r.rejected for r in history)
            cause = f"; the last: {last_failure}" if last_failure else ""
            return (f"no client could train: none of the {len(history)} rounds aggregated an "
                    f"update ({failures} failed, {timeouts} timed out, {rejected} rejected"
                    f"{cause}); nothing to export")
        return ("no round produced a global model with a finite validation loss (every "
                "update diverged?); nothing to export")

    def _fail(self, reason: str) -> None:
        """End the run with ``reason``: metrics.json says so, its rounds are kept."""
        write_json(self.run_dir / "metrics.json", self._metrics(status="failed", error=reason))
        raise FedgeError(reason)

    def _round_stats(self, grid: RoundGrid) -> Callable[[], RoundStats]:
        """What the tracker records of each round's (or FedBuff interval's) messages."""
        if self.config.privacy.secagg:
            return secure_round_stats(grid)
        if self.config.strategy.name == "fedbuff":
            return lambda: self._strategy.interval_stats()
        return lambda: grid.stats[-1] if grid.stats else RoundStats()

    def _buffered(self, settings: BufferSettings,
                  clock: Callable[[], float] | None) -> FedBuff:
        config, tracker = self.config, self._tracker
        return FedBuff(settings,
                       train_metrics_aggr_fn=tracker.aggregate_train_metrics,
                       max_norm_ratio=config.strategy.max_norm_ratio, frozen=self.start.frozen,
                       on_screened=tracker.count_rejected, on_bytes=tracker.count_bytes,
                       clock=clock, min_nodes=config.strategy.min_clients,
                       poll_interval=config.strategy.poll_interval, seed=config.seed)

    def _screened(self, strategy: Strategy, arrays: ArrayRecord) -> Strategy:
        """``strategy`` behind the update screen, after decoding, on the exchanged entries."""
        strategy = UpdateScreen(strategy, self.config.strategy.max_norm_ratio,
                                self._tracker.count_rejected,
                                round_offset=self._tracker.completed_rounds)
        # Decoding comes first: the screen and the strategy see weights, not updates.
        strategy = DecodeUpdates(strategy, self._tracker.count_bytes)
        return self._with_partial_updates(strategy, arrays)

    def _starting_point(self) -> tuple[Strategy, ArrayRecord]:
        """A fresh model, or the resumed checkpoint's weights, strategy state and history."""
        self._best_state: dict[str, torch.Tensor] | None = None
        if self.resume is None:
            return self._strategy, ArrayRecord(self.start.state)
        checkpoint = self.resume
        restore_strategy_state(self._strategy, checkpoint.strategy_state)
        self._tracker.resume(checkpoint.history, checkpoint.initial)
        if (self.run_dir / "best.pt").exists():
            self._best_state = load_checkpoint(self.run_dir / "best.pt").state_dict
        log.info("resuming after round %d (best round %s)", checkpoint.round,
                 self._tracker.best_round)
        arrays = ArrayRecord(checkpoint.state_dict)
        if isinstance(self._strategy, FedBuff):  # it counts its versions itself
            return self._strategy, arrays
        return ContinuedRounds(self._strategy, checkpoint.round), arrays

    def _rounds(self, strategy: Strategy | FedBuff, grid: Grid, arrays: ArrayRecord,
                rounds: int) -> None:
        # Flower's strategies count a resumed run's rounds from 1; FedBuff its versions on.
        offset = 0 if isinstance(strategy, FedBuff) else self._tracker.completed_rounds
        try:
            if self.config.privacy.secagg:
                run_secure_rounds(self.config, grid, arrays, rounds, self._tracker,
                                  self._train_config(), self.start.frozen)
                return
            strategy.start(
                grid=grid, initial_arrays=arrays, num_rounds=rounds,
                timeout=self.config.strategy.round_timeout, train_config=self._train_config(),
                evaluate_fn=lambda server_round, new: self._evaluate(server_round + offset,
                                                                     new),
            )
        except GlobalEarlyStop as stop:
            log.info("global early stopping after round %d: %s",
                     self._tracker.completed_rounds, stop)

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> object:
        self.observers.phase("evaluating")
        return self._tracker.evaluate(server_round, arrays)

    def _run_start(self) -> RunStart:
        return RunStart(run_dir=self.run_dir, config=self.config,
                        fingerprint=self.spec.fingerprint, origin=self.start.origin,
                        unit=step_name(self.config.strategy), headline=HEADLINE[self.spec.task],
                        resumed_after=self.resume.round if self.resume else 0,
                        command=self.command, versions=component_versions(),
                        history=tuple(self.resume.history) if self.resume else ())

    def _staleness_since_last_record(self) -> list[int]:
        if not isinstance(self._strategy, FedBuff):
            return []
        versions = self._strategy.versions[self._reported_versions:]
        self._reported_versions = len(self._strategy.versions)
        return [tau for version in versions for tau in version.staleness]

    def _train_config(self) -> ConfigRecord:
        model = {MODEL_SPEC: self.spec.to_json()}
        if self.spec.program is not None:
            model[PROGRAM_KEY] = self.spec.program
        if self.start.frozen:
            model[FROZEN_KEY] = list(self.start.frozen)
        if self.start.edge is not None:  # for gateways; fedge client ignores them
            model.update({EDGE_MANIFEST_KEY: json.dumps(self.start.edge.manifest),
                          EDGE_TRAIN_KEY: self.start.edge.train,
                          EDGE_PREDICT_KEY: self.start.edge.predict})
        if self.config.task.monitor != "val_loss":
            model[MONITOR] = self.config.task.monitor
        return ConfigRecord({
            **model, **self.config.training.as_config(), SEED: self.config.seed,
            EXPECTED_CLIENT_KEY: EXPECTED_CLIENT,
        })

    def _checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> Checkpoint:
        return Checkpoint(
            round=server_round, state_dict=state, model_spec=self.spec,
            config=self.config.flat(),
            reference_inputs=torch.as_tensor(self.data.val_x[:REFERENCE_SAMPLES]),
            history=[r.as_dict() for r in self._tracker.history],
            best_round=self._tracker.best_round, initial=self._tracker.initial,
            strategy_state=strategy_state(self._strategy), model_origin=self.start.origin,
            frozen=self.start.frozen,
        )

    def _started(self, initial: dict) -> None:
        headline = HEADLINE[self.spec.task]
        log.info("round 0 (the starting model): val_loss %.4f val_%s %s", initial["val_loss"],
                 headline, initial["val_measures"].get(headline))
        self.observers.initial(initial)
        if self.on_start:
            self.on_start(initial)

    def _save_round(self, record: RoundRecord, arrays: ArrayRecord, improved: bool) -> None:
        state = arrays.to_torch_state_dict()
        checkpoint = self._checkpoint(record.round, state)
        if improved:
            self._best_state = state
            checkpoint.save(self.run_dir / "best.pt")
        checkpoint.save(self.run_dir / "checkpoint.pt")
        write_json(self.run_dir / "metrics.json", self._metrics(status="running"))
        headline = HEADLINE[self.spec.task]
        log.info("%s %d: val_loss %.4f val_%s %s (%d clients, %d failed, %d timed out, "
                 "%.2fs)", step_name(self.config.strategy), record.round, record.val_loss,
                 headline, record.measured(f"val_{headline}"), record.num_clients,
                 record.failures, record.timeouts, record.seconds)
        self.observers.round_done(record.as_dict(), improved,
                                  self._staleness_since_last_record())
        if self.on_round:
            self.on_round(record, improved)

    def _metrics(self, status: str, **extra: object) -> dict:
        tracker = self._tracker
        return {
            "status": status,
            "config": self.config.flat(),
            "data": self.data.source,
            "model_spec": self.spec.model_dump(mode="json"),
            "model": {"origin": self.start.origin, "fingerprint": self.spec.fingerprint,
                      "init": self.config.model.init, "frozen": list(self.start.frozen)},
            "initial": tracker.initial,
            "rounds": [r.as_dict() for r in tracker.history],
            "best_round": tracker.best_round,
            "monitor": self.config.task.monitor,
            "stopped_early": tracker.stopped_early,
            "privacy": privacy_report(self._strategy, self.config.strategy.clients),
            **self._asynchronous_report(),
            **extra,
        }


    def _asynchronous_report(self) -> dict:
        if not isinstance(self._strategy, FedBuff):
            return {}
        return {"asynchronous": self._strategy.report(),
                "versions": [r.as_dict() for r in self._strategy.versions]}

    def _finish(self, seconds: float) -> RunOutcome:
        tracker, data = self._tracker, self.data
        self.observers.phase("exporting")
        model = build_model(self.spec)
        model.load_state_dict(self._best_state)
        self.spec = self._with_threshold(model)
        test = evaluate_measures(model, self.spec, data.test_x, data.test_y, where=TEST_SET)
        report = export_onnx(model, self.spec, data.test_x, self.run_dir / "model.onnx")
        report["best_round"] = tracker.best_round
        write_json(self.run_dir / "onnx_report.json", report)
        plot_curves(self.run_dir / "curves.png", [r.as_dict() for r in tracker.history],
                    tracker.best_round, step_name(self.config.strategy),
                    HEADLINE[self.spec.task])
        write_json(self.run_dir / "metrics.json", self._metrics(
            status="finished",
            test={**test, "samples": len(data.test_y), "round": tracker.best_round},
            seconds=seconds,
        ))
        self.observers.phase("finished")
        self.observers.ended("finished")
        return RunOutcome(self.run_dir, len(tracker.history), tracker.best_round,
                          tracker.stopped_early, test["loss"], test.get("accuracy"), report,
                          privacy_report(self._strategy, self.config.strategy.clients), test)

    def _with_threshold(self, model: torch.nn.Module) -> ModelSpec:
        """The spec with the decision threshold (binary, multilabel) chosen by
        ``--threshold`` on the server's validation set at the best round, also written
        into best.pt so that a later export keeps it."""
        if self.spec.task not in ("binary", "multilabel"):
            return self.spec
        _, scores = evaluate(model, self.spec, self.data.val_x, self.data.val_y)
        threshold = choose_threshold(self.config.task.threshold, scores, self.data.val_y)
        spec = self.spec.model_copy(update={"threshold": threshold})
        best = self.run_dir / "best.pt"
        if best.exists():
            checkpoint = load_checkpoint(best)
            checkpoint.model_spec = spec
            checkpoint.save(best)
        log.info("decision threshold %s (--threshold %s, on the server's validation set)",
                 ", ".join(f"{t:.4g}" for t in threshold), self.config.task.threshold or 0.5)
        return spec


def prepare(config: RunConfig, data: ServerData,
            factory: Callable[..., torch.nn.Module] | None = None) -> StartingModel:
    """The starting model of a run of ``config`` on the server's ``data``, every check
    included; ``factory`` builds your own model instead of importing ``config.model.name``."""
    return starting_model(config, data.val_x, data.val_y, data.num_classes,
                          vocab_size=data.vocab_size, class_names=data.class_names,
                          factory=factory, non_feature_columns=data.non_feature_columns)


def _check_same_model(start: StartingModel, checkpoint: Checkpoint) -> None:
    """Resuming with another model would average weights of two different networks."""
    saved = checkpoint.model_spec
    if saved.fingerprint != start.spec.fingerprint:
        raise FedgeError(f"cannot resume: the model {start.spec.name} is not the one the run "
                         f"started with ({checkpoint.model_origin or saved.name}, fingerprint "
                         f"{saved.fingerprint}); its architecture has fingerprint "
                         f"{start.spec.fingerprint}")


def _check_resumable(config: RunConfig, checkpoint: Checkpoint) -> None:
    # Settings added after the checkpoint was written count as their defaults.
    saved = RunConfig().flat()
    saved.update(flat_settings(checkpoint.config))
    current = config.flat()
    for values in (saved, current):  # older checkpoints hold FedAdam's 0.1 as a number
        if values.get("server_lr") is None:
            values["server_lr"] = default_server_lr(values["strategy"])
        # and name the default data set even for runs on your own data, which have none
        values["dataset"] = values.get("dataset") or DEFAULT_DATASET
    changed = sorted(k for k, v in current.items()
                     if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise FedgeError("cannot resume: the run folder's checkpoint was made with other "
                         f"settings ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
