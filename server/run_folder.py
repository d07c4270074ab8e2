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
SERVER_STATE = (".flower", "superlink.log")


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


def save_torch(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def plot_curves(path: Path, rounds: Sequence[dict], best_round: int | None,
                unit: str = "round") -> None:
    """Loss and accuracy per round (or FedBuff's model ``version``): clients' training
    loss, server validation; and validation accuracy against time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    numbers = [r["round"] for r in rounds]
    figure = Figure(figsize=(13, 3.5), layout="constrained")
    loss_axes, acc_axes, time_axes = figure.subplots(1, 3)
    loss_axes.plot(numbers, [r["train_loss"] for r in rounds], "o-", label="train (clients)")
    loss_axes.plot(numbers, [r["val_loss"] for r in rounds], "o-", label="validation (server)")
    acc_axes.plot(numbers, [r["val_accuracy"] for r in rounds], "o-", color="tab:orange",
                  label="validation (server)")
    for axes, title in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        if best_round is not None:
            axes.axvline(best_round, color="grey", linestyle="--", label=f"best {unit}")
        axes.set(xlabel=unit, title=title)
        axes.legend()
    timed = [r for r in rounds if r.get("elapsed_seconds") is not None]
    simulated = any(r.get("simulated_seconds") is not None for r in timed)
    time_axes.plot([r["elapsed_seconds"] for r in timed], [r["val_accuracy"] for r in timed],
                   "o-", color="tab:orange", label="validation (server)")
    time_axes.set(xlabel="simulated seconds" if simulated else "seconds",
                  title="accuracy over time")
    time_axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
