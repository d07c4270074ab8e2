"""The federation's trackers (``--track``): one MLflow run or TensorBoard folder per fedge
run, fed as the run goes — its settings by section, every round's metrics (the server's
validation by the task's measures, the clients' reports, failures, timeouts, bytes, ε,
simulated time), and at the end the run folder's model and files.

A resumed run continues the same MLflow run: ``tracking.json`` in the run folder keeps
each tracker's run id and the last round it took, and the rounds it missed (a tracker
that was down when the server was killed) are sent when the run resumes.
"""

import json
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fedge.config import RunConfig, TrackingSettings
from fedge.files import write_json
from fedge.server.observers import RunObserver, RunStart
from fedge.tracking import (
    LOCAL_MLFLOW,
    Target,
    Tracker,
    check_targets,
    name_part,
    open_sink,
    scalars,
)

STATE_FILE = "tracking.json"
TENSORBOARD_FOLDER = "tensorboard"  # in the run folder, unless --track tensorboard:DIR
# fedge's ending of a run → MLflow's run status
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
ARTIFACTS = ("metrics.json", "curves.png", "onnx_report.json")
# A round record's entries that are not numbers of the round itself.
NOT_ROUND_METRICS = ("round", "val_measures", "clients", "contributions", "val_accuracy")

_state_lock = threading.Lock()  # trackers of one run write tracking.json from their threads


def component_versions() -> dict[str, str]:
    """The versions a run's tags name."""
    found = {}
    for package in ("fedge", "flwr", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def open_trackers(settings: TrackingSettings, run_dir: Path) -> list["FederationTracker"]:
    """One observer per ``--track`` target of the run in ``run_dir``."""
    return [FederationTracker(target, run_dir, settings.track_timeout)
            for target in check_targets(settings.track)]


def default_place(target: Target, run_dir: Path) -> Path:
    """Where ``target`` writes unless it says: MLflow's local store beside the run folder,
    TensorBoard's event files in it."""
    if target.kind == "mlflow":
        return run_dir.parent / LOCAL_MLFLOW
    return run_dir / TENSORBOARD_FOLDER


def tracked_places(settings: TrackingSettings, run_dir: Path) -> list[str]:
    """Each tracker of a run in ``run_dir``, with where it writes."""
    return [open_sink(target, default_place(target, run_dir)).name
            for target in check_targets(settings.track)]


def settings_as_params(config: RunConfig) -> dict[str, str]:
    """Every setting as ``section.name`` → text (MLflow's parameters)."""
    params = {"seed": str(config.seed)}
    for section, values in config.model_dump(mode="json").items():
        if isinstance(values, dict):
            for name, value in values.items():
                if value is not None and value != []:
                    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                    params[f"{section}.{name}"] = text[:6000]  # MLflow's longest value
    return params


def round_metrics(record: dict, staleness: Sequence[int] = ()) -> dict[str, float]:
    """A round record's numbers by name: the server's ``val_*`` measures, the round's
    counts and times, and each client's own report as ``client/KEY/NAME``."""
    found = scalars({k: v for k, v in record.items() if k not in NOT_ROUND_METRICS})
    found |= scalars({k: v for k, v in (record.get("val_measures") or {}).items()
                      if k != "loss"}, prefix="val_")
    for key, values in (record.get("clients") or {}).items():
        found |= scalars(values, prefix=f"client/{name_part(key)}/")
    if staleness:
        found["staleness_mean"] = sum(staleness) / len(staleness)
        found["staleness_max"] = float(max(staleness))
    return found


class FederationTracker(RunObserver):
    """Feeds one tracker (``target``) from a federation's events."""

    def __init__(self, target: Target, run_dir: Path, flush_timeout: float) -> None:
        self.target, self.run_dir = target, run_dir
        self.sink = open_sink(target, default_place(target, run_dir))
        self.key = self.sink.name
        self.tracker = Tracker(self.sink, flush_timeout, on_opened=self._remember_run)
        self.unit = "round"

    def started(self, run: RunStart) -> None:
        self.unit = run.unit
        state = self._state()
        resumed = run.resumed_after > 0
        tags = {"fedge.run_dir": str(run.run_dir.resolve()), "fedge.command": run.command,
                "fedge.model_fingerprint": run.fingerprint,
                "fedge.model_origin": run.origin,
                "fedge.strategy": run.config.strategy.name, "fedge.task": run.config.task.name,
                **{f"{package}.version": v for package, v in run.versions.items()}}
        tags = {k: v for k, v in tags.items() if v}  # a built-in model has no fingerprint
        if self.target.kind == "tensorboard":
            resume_id = str(run.resumed_after) if resumed else None
        else:
            resume_id = state.get("run_id") if resumed else None
        self.tracker.open(run.run_dir.name, tags, resume_id)
        self.tracker.params(settings_as_params(run.config))
        taken = state.get("logged_through", 0) if resumed else 0
        for record in run.history:
            if taken < record["round"] <= run.resumed_after:
                self._log(record, ())

    def initial(self, measured: dict) -> None:
        values = scalars({"val_loss": measured.get("val_loss")})
        values |= scalars({k: v for k, v in (measured.get("val_measures") or {}).items()
                           if k != "loss"}, prefix="val_")
        self.tracker.metrics(values, 0, "the starting model")

    def round_done(self, record: dict, improved: bool, staleness: Sequence[int] = ()) -> None:
        self._log(record, staleness, improved)

    def _log(self, record: dict, staleness: Sequence[int], improved: bool | None = None) -> None:
        values = round_metrics(record, staleness)
        if improved is not None:
            values["improved"] = float(improved)
        number = int(record["round"])

        def written() -> None:
            self.sink.metrics(values, number)
            self._update_state(logged_through=number)

        self.tracker.write(f"{self.unit} {number}", written)

    def ended(self, status: str, error: str | None = None) -> None:
        files = [self.run_dir / name for name in ARTIFACTS if (self.run_dir / name).is_file()]
        model = self.run_dir / "model.onnx"
        if status == "finished":
            files += sorted(self.run_dir.glob("*.onnx"))
        self.tracker.artifacts(files, model if model.is_file() and status == "finished"
                               else None)
        self.tracker.finish(MLFLOW_STATUS.get(status, "FINISHED"))

    def close(self) -> None:
        self.tracker.close()

    def _remember_run(self, run_id: str | None) -> None:
        if run_id is not None:
            self._update_state(run_id=run_id)

    def _state(self) -> dict:
        try:
            found = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        mine = found.get(self.key) if isinstance(found, dict) else None
        return mine if isinstance(mine, dict) else {}

    def _update_state(self, **values: object) -> None:
        with _state_lock:
            path = self.run_dir / STATE_FILE
            try:
                everything = json.loads(path.read_text())
            except (OSError, ValueError):
                everything = {}
            everything[self.key] = {**everything.get(self.key, {}), **values}
            write_json(path, everything)
