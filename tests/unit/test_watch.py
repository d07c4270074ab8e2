"""`fedge watch`'s drawing, from hand-written metrics: the sparkline, the rounds table,
the plain lines, and the watch loop on a folder whose metrics.json a thread writes."""

import io
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedge.cli import app
from fedge.errors import FedgeError
from fedge.watch import (
    WAITING,
    header,
    measured,
    render,
    round_line,
    rounds_table,
    sparkline,
    summary_line,
    watch,
)


def record(number: int, val_loss: float, accuracy: float | None, **extra) -> dict:
    return {"round": number, "train_loss": val_loss + 0.1, "val_loss": val_loss,
            "val_accuracy": accuracy, "num_clients": 3, "failures": 0, "timeouts": 0,
            "rejected": 0, "seconds": 1.25, "simulated_seconds": None, "epsilon": None,
            "bytes_per_client": 1000.0, "elapsed_seconds": 1.25 * number,
            "val_measures": {"accuracy": accuracy, "balanced_accuracy": None,
                             "macro_f1": accuracy and accuracy - 0.05,
                             "per_class": {"0": {"precision": 1.0, "recall": 0.5}},
                             "confusion_matrix": [[1, 0], [0, 1]]},
            "clients": None, **extra}


def run(status: str = "running", strategy: str = "fedavg", **extra) -> dict:
    metrics = {
        "status": status,
        "config": {"rounds": 20, "strategy": strategy, "task": "classification",
                   "clients": 3},
        "initial": {"val_loss": 2.3, "val_measures": {"accuracy": 0.1}},
        "rounds": [record(1, 1.5, 0.60), record(2, 0.9, 0.80, failures=1, timeouts=2),
                   record(3, 1.1, 0.78)],
        "best_round": 2, "monitor": "val_loss", "stopped_early": False,
    }
    return {**metrics, **extra}


def text(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


# The sparkline.

def test_a_sparkline_runs_from_the_lowest_bar_to_the_highest():
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([3, 2, 1, 0]) == "█▆▃▁"
    assert sparkline(list(range(8))) == "▁▂▃▄▅▆▇█"


def test_a_sparkline_blanks_what_is_missing_and_keeps_flat_values_mid_height():
    assert sparkline([1.0, None, float("nan"), 2.0]) == "▁  █"
    assert sparkline([0.5, 0.5, 0.5]) == "▄▄▄"
    assert sparkline([0.7]) == "▄"
    assert sparkline([]) == ""
    assert sparkline([None, None]) == "  "


def test_a_sparkline_with_a_width_shows_the_last_values():
    assert sparkline(list(range(100)), width=4) == "▁▃▆█"
    assert len(sparkline(list(range(100)), width=60)) == 60
    assert sparkline([1, 2], width=0) == ""


# The pieces of the view.

def test_a_measure_is_read_as_a_finite_scalar_or_none():
    found = record(1, 0.5, 0.9)
    assert measured(found, "val_loss") == 0.5
    assert measured(found, "val_macro_f1") == pytest.approx(0.85)
    assert measured(found, "accuracy") == 0.9
    assert measured(found, "val_balanced_accuracy") is None  # null
    assert measured(found, "val_per_class") is None  # a table, not a scalar
    assert measured({"round": 1, "val_accuracy": 0.7}, "val_accuracy") == 0.7  # older runs
    assert measured(None, "val_loss") is None


def test_the_table_shows_each_round_and_stars_the_best():
    shown = text(rounds_table(run()))
    lines = [line for line in shown.splitlines() if line.startswith("│")]
    assert len(lines) == 3
    assert "round" in shown and "val_loss" in shown and "val_accuracy" in shown
    assert "val_macro_f1" not in shown  # monitoring val_loss: loss and headline only
    second = lines[1]
    assert "0.900" in second and "0.800" in second and "★ best" in second
    assert second.split("│")[6].strip() == "1" and second.split("│")[7].strip() == "2"
    assert "1.25" in second
    assert "★" not in lines[0] + lines[2]


def test_the_table_shows_the_last_rounds_and_the_monitored_measure():
    metrics = run(monitor="val_macro_f1")
    metrics["rounds"] = [record(n, 1.0 / n, 0.5 + n / 100) for n in range(1, 31)]
    metrics["best_round"] = 30
    shown = text(rounds_table(metrics, last=5))
    rows = [line for line in shown.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["26", "27", "28", "29", "30"]
    assert "val_macro_f1" in shown and "0.750" in rows[-1]  # 0.8 - 0.05
    assert "the last 5 of 30 rounds" in shown


def test_a_fedbuff_run_counts_versions():
    metrics = run(strategy="fedbuff")
    assert "┃ version ┃" in text(rounds_table(metrics))
    assert "version 3/20" in header(metrics).plain
    assert "best version 2: val_loss 0.900" in header(metrics).plain
    assert round_line(metrics, metrics["rounds"][0]).startswith("version 1/20  ")
    finished = run("finished", strategy="fedbuff", test={"loss": 0.3, "accuracy": 0.9})
    assert "3 evaluations" in summary_line(finished)
    assert "best version 2" in summary_line(finished)


def test_the_header_says_the_status_progress_and_best_round():
    line = header(run(), "runs/a", age=4.2).plain
    assert line.startswith("runs/a  running  ·  round 3/20  ·  best round 2: val_loss 0.900")
    assert "fedavg, classification, 3 clients" in line and "updated 4s ago" in line
    assert "updated" not in header(run("finished"), age=4.2).plain
    assert "stopped early" in header(run("finished", stopped_early=True)).plain
    assert "best" not in header(run(rounds=[], best_round=None)).plain


def test_the_view_of_a_running_run():
    shown = text(render(run(), "runs/a"))
    assert "running" in shown and "★ best" in shown
    assert "val_loss █▁▃  (per round; lower is better)" in shown
    assert "finished:" not in shown and "failed after" not in shown


def test_the_view_of_a_finished_run_ends_with_its_test_result():
    metrics = run("finished", test={"loss": 0.812, "accuracy": 0.9412, "samples": 100},
                  seconds=12.34, stopped_early=True)
    shown = text(render(metrics))
    assert shown.rstrip().splitlines()[-1] == (
        "finished: 3 rounds, stopped early in 12.3s; best round 2: val_loss 0.900; "
        "test accuracy 0.941 (loss 0.812)")


def test_the_view_of_a_failed_run_shows_the_error():
    metrics = run("failed", error="no client could train: none of the 3 rounds aggregated")
    shown = text(render(metrics))
    assert "failed after 3 rounds: no client could train: none of the 3 rounds" in shown
    assert summary_line(metrics).startswith("failed after 3 rounds: no client could train")
    nothing = run("failed", rounds=[], best_round=None, error="no round completed")
    assert "failed after 0 rounds: no round completed" in text(render(nothing))


def test_the_view_before_the_first_round_waits():
    assert WAITING in text(render(None, "runs/a"))
    assert WAITING in text(render(run(rounds=[], best_round=None)))


def test_another_task_shows_its_headline_measure():
    metrics = run(monitor="val_mae")
    metrics["config"]["task"] = "regression"
    metrics["rounds"] = [{"round": 1, "train_loss": 2.0, "val_loss": 1.0, "val_accuracy": None,
                          "num_clients": 2, "failures": 0, "timeouts": 0, "seconds": 0.5,
                          "val_measures": {"mae": 0.42, "rmse": 0.6, "r2": None}}]
    metrics["best_round"] = 1
    shown = text(rounds_table(metrics))
    assert "val_mae" in shown and "0.420" in shown and "val_accuracy" not in shown
    assert round_line(metrics, metrics["rounds"][0]) == (
        "round 1/20  train_loss 2.000  val_loss 1.000  val_mae 0.420  clients 2  0.50s  ★ best")
    assert "val_mae ▄  (per round; lower is better)" in text(render(metrics))


def test_a_plain_line_names_failures_only_when_there_were_some():
    metrics = run()
    assert round_line(metrics, metrics["rounds"][0]) == (
        "round 1/20  train_loss 1.600  val_loss 1.500  val_accuracy 0.600  clients 3  1.25s")
    assert round_line(metrics, metrics["rounds"][1]).endswith(
        "clients 3  failed 1  timed out 2  1.25s  ★ best")


# The loop, on a folder a thread writes as a server does (temp file, rename).

def write(folder: Path, metrics: dict) -> None:
    temporary = folder / "metrics.json.tmp"
    temporary.write_text(json.dumps(metrics))
    temporary.rename(folder / "metrics.json")


def plain_console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def test_watch_prints_a_line_per_new_round_and_returns_when_the_run_ends(tmp_path):
    def server() -> None:
        time.sleep(0.2)
        for count in (1, 2, 3):
            write(tmp_path, {**run(), "rounds": run()["rounds"][:count],
                             "best_round": min(count, 2)})
            time.sleep(0.15)
        write(tmp_path, run("finished", test={"loss": 0.5, "accuracy": 0.9}))

    console = plain_console()
    writer = threading.Thread(target=server)
    writer.start()
    try:
        metrics = watch(tmp_path, refresh=0.02, console=console, timeout=10)
    finally:
        writer.join()
    assert metrics["status"] == "finished"
    lines = console.file.getvalue().splitlines()
    assert lines[0] == f"{tmp_path}: {WAITING}"
    assert lines[1] == f"watching {tmp_path}: fedavg, classification, 3 clients"
    assert [line.split("  ")[0] for line in lines[2:5]] == ["round 1/20", "round 2/20",
                                                           "round 3/20"]
    assert lines[2].endswith("★ best") and lines[3].endswith("★ best")
    assert lines[5].startswith("finished: 3 rounds; best round 2: val_loss 0.900; "
                               "test accuracy 0.900")
    assert len(lines) == 6


def test_watch_on_a_failed_run_returns_at_once(tmp_path):
    write(tmp_path, run("failed", error="every client failed"))
    console = plain_console()
    started = time.monotonic()
    assert watch(tmp_path, console=console)["status"] == "failed"
    assert time.monotonic() - started < 1
    assert console.file.getvalue().splitlines()[-1] == (
        "failed after 3 rounds: every client failed")


def test_watch_on_a_terminal_draws_the_view_in_place(tmp_path):
    write(tmp_path, run("finished", test={"loss": 0.5, "accuracy": 0.9}))
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    assert watch(tmp_path, console=console)["status"] == "finished"
    shown = console.file.getvalue()
    assert "★ best" in shown and "val_loss █▁▃" in shown and "test accuracy 0.900" in shown


def test_watch_gives_up_after_its_timeout(tmp_path):
    console = plain_console()
    assert watch(tmp_path, refresh=0.05, console=console, timeout=0.2) == {}
    assert console.file.getvalue() == f"{tmp_path}: {WAITING}\n"
    write(tmp_path, run())
    assert watch(tmp_path, refresh=0.05, console=plain_console(),
                 timeout=0.2)["status"] == "running"


def test_watch_refuses_what_is_no_folder_and_a_refresh_of_nothing(tmp_path):
    with pytest.raises(FedgeError, match="no run folder at"):
        watch(tmp_path / "missing", console=plain_console())
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedgeError, match="is not a folder"):
        watch(tmp_path / "file", console=plain_console())
    for refresh in (0, -1, float("nan")):
        with pytest.raises(FedgeError, match="refresh must be"):
            watch(tmp_path, refresh=refresh, console=plain_console())
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(FedgeError, match="not valid JSON"):
        watch(tmp_path, console=plain_console())


# The command: exit status 0 for a finished run, 1 for a failed one, 2 for bad input.

@pytest.mark.parametrize("status, code", [("finished", 0), ("failed", 1)])
def test_the_command_exits_with_the_runs_outcome(tmp_path, status, code):
    write(tmp_path, run(status, test={"loss": 0.5, "accuracy": 0.9}, error="it broke"))
    result = CliRunner().invoke(app, ["watch", str(tmp_path)])
    assert result.exit_code == code, result.output
    assert result.stdout.splitlines()[-1].startswith(f"{status}")


def test_the_command_refuses_a_refresh_of_nothing(tmp_path):
    result = CliRunner().invoke(app, ["watch", str(tmp_path), "--refresh", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: refresh must be a number of seconds above 0, not 0.0"
