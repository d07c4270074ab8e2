"""The run folder: every file written atomically (temp file, then rename)."""

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from fedge.errors import FedgeError
from fedge.files import write_atomic

RUN_MARKERS = ("metrics.json", "checkpoint.pt")


def prepare_run_dir(path: Path, overwrite: bool = False) -> Path:
    """Create ``path``; an existing non-empty folder is an error unless ``overwrite``,
    and even then only a previous run folder is ever emptied."""
    if path.exists() and not path.is_dir():
        raise FedgeError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FedgeError(f"output folder {path} is not empty; choose another "
                             "or pass --overwrite")
        if not any((path / marker).exists() for marker in RUN_MARKERS):
            raise FedgeError(f"refusing to overwrite {path}: it does not look like a "
                             "fedge run folder")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FedgeError(f"cannot make the run folder {path}: {error.strerror}") from None
    return path


def resumable_checkpoint(path: Path) -> Path:
    """The checkpoint to continue an interrupted run in folder ``path`` from."""
    checkpoint = path / "checkpoint.pt"
    if not checkpoint.is_file():
        raise FedgeError(f"cannot resume: {path} holds no checkpoint.pt")
    if run_finished(path):
        raise FedgeError(f"cannot resume: the run in {path} has already finished")
    if failure := run_failure(path):
        raise FedgeError(f"cannot resume: the run in {path} failed ({failure}); start a new "
                         "run in another folder")
    return checkpoint


# What a server start leaves in its run folder before the first round completes.
SERVER_STATE = (".flower", "superlink.log", "tracking.json", "tensorboard")


def server_checkpoint(path: Path) -> Path | None:
    """The checkpoint a server started on run folder ``path`` resumes from, or None for
    a new run; a clear error for a finished run or a folder that holds something else."""
    if path.exists() and not path.is_dir():
        raise FedgeError(f"run folder {path} exists and is not a folder")
    if not path.is_dir():
        return None
    if run_finished(path):
        raise FedgeError(f"the run in {path} has already finished; give a new run folder "
                         "with --out")
    if (path / "checkpoint.pt").exists():
        return resumable_checkpoint(path)
    if (path / "metrics.json").exists():
        raise FedgeError(f"{path} holds a run without a checkpoint; choose another folder")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in SERVER_STATE)
    if foreign:
        raise FedgeError(f"run folder {path} is not empty and holds no fedge run (it holds "
                         f"{', '.join(foreign[:3])}); choose another with --out")
    return None


def run_finished(path: Path) -> bool:
    """Whether the run in folder ``path`` completed (its metrics.json says so)."""
    return _metrics(path).get("status") == "finished"


def run_failure(path: Path) -> str | None:
    """Why the run in folder ``path`` failed for good, if its metrics.json says it did
    (a failed run cannot go on: resuming it would repeat the failure)."""
    metrics = _metrics(path)
    return str(metrics.get("error")) if metrics.get("status") == "failed" else None


def _metrics(path: Path) -> dict:
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def read_metrics(path: Path) -> dict:
    """The metrics.json of run folder ``path``, or a clear error."""
    file = Path(path) / "metrics.json"
    if not file.is_file():
        raise FedgeError(f"{path} is no run folder: it has no metrics.json")
    try:
        metrics = json.loads(file.read_text())
    except ValueError as error:
        raise FedgeError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(metrics, dict):
        raise FedgeError(f"{file} holds no run's metrics")
    return metrics


def save_torch(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def plot_curves(path: Path, rounds: Sequence[dict], best_round: int | None,
                unit: str = "round", headline: str = "accuracy") -> None:
    """Loss and the task's ``headline`` measure per round (or FedBuff's model
    ``version``): clients' training loss, server validation; and the validation measure
    against time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    numbers = [r["round"] for r in rounds]
    figure = Figure(figsize=(13, 3.5), layout="constrained")
    loss_axes, acc_axes, time_axes = figure.subplots(1, 3)
    loss_axes.plot(numbers, [r["train_loss"] for r in rounds], "o-", label="train (clients)")
    loss_axes.plot(numbers, [r["val_loss"] for r in rounds], "o-", label="validation (server)")
    def measured(record: dict) -> float | None:
        found = (record.get("val_measures") or {}).get(headline)
        return found if found is not None else record.get(f"val_{headline}")

    title = headline.replace("_", " ")
    acc_axes.plot(numbers, [measured(r) for r in rounds], "o-", color="tab:orange",
                  label="validation (server)")
    for axes, name in ((loss_axes, "loss"), (acc_axes, title)):
        if best_round is not None:
            axes.axvline(best_round, color="grey", linestyle="--", label=f"best {unit}")
        axes.set(xlabel=unit, title=name)
        axes.legend()
    timed = [r for r in rounds if r.get("elapsed_seconds") is not None]
    simulated = any(r.get("simulated_seconds") is not None for r in timed)
    time_axes.plot([r["elapsed_seconds"] for r in timed], [measured(r) for r in timed],
                   "o-", color="tab:orange", label="validation (server)")
    time_axes.set(xlabel="simulated seconds" if simulated else "seconds",
                  title=f"{title} over time")
    time_axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())


LAG_FACTOR = 1.5  # a client lags when its local validation loss exceeds the median's by this


def client_report(metrics: dict) -> list[dict]:
    """Each client's last report in a run's metrics.json: the round it last took part in,
    its examples, training loss and local validation measures, and whether it lags: its
    local validation loss is more than :data:`LAG_FACTOR` × the median client's in that
    table. Empty when the run kept no per-client metrics (differential privacy, or a run
    from before them)."""
    last: dict[str, dict] = {}
    for record in metrics.get("rounds", []):
        for key, values in (record.get("clients") or {}).items():
            last[key] = {"client": key, "round": record["round"], **values}
    rows = sorted(last.values(), key=lambda row: int(row["client"]))
    losses = sorted(row["val_loss"] for row in rows if row.get("val_loss") is not None)
    median = losses[len(losses) // 2] if losses else None
    for row in rows:
        loss = row.get("val_loss")
        row["lags"] = bool(median is not None and loss is not None
                           and loss > LAG_FACTOR * median)
    return rows
