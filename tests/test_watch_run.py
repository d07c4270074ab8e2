"""`fedge watch` as a user runs it, beside a real `fedge simulate`: started on the empty
run folder, it waits, prints a line per round as the run writes them (its output is a
pipe, so plain lines, not a live view), and exits by itself when the run has finished."""

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_fedge

ROUNDS = 3
SIMULATE = ["--dataset", "digits", "--clients", "3", "--rounds", str(ROUNDS), "--local-epochs",
            "1", "--partition", "iid"]


def start_fedge(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def first_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line ``process`` prints, within ``timeout`` seconds."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return process.stdout.readline()


def unstarred(out: str) -> list[str]:
    return [line.removesuffix("  ★ best") for line in out.splitlines()]


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A run folder, and what `fedge watch` printed (stdout, stderr) while a simulation
    trained into it; watch is started first, on the empty folder."""
    run_dir = tmp_path_factory.mktemp("watched") / "run"
    run_dir.mkdir()  # as `fedge server` leaves it while it waits for clients
    watcher = start_fedge("watch", str(run_dir), "--refresh", "0.2")
    simulation = None
    try:
        waiting = first_line(watcher, timeout=60)
        assert waiting == f"{run_dir}: waiting for the run's first round…\n"
        simulation = start_fedge("simulate", *SIMULATE, "--out", str(run_dir))
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, out + err
        simulated = simulation.communicate(timeout=60)
        assert simulation.returncode == 0, simulated
        return run_dir, waiting + out, err
    finally:
        for process in (watcher, simulation):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def test_watch_follows_a_run_to_its_end_and_exits_by_itself(followed):
    run_dir, out, err = followed
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    lines = out.splitlines()
    assert lines[1] == f"watching {run_dir}: fedavg, classification, 3 clients"
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split("  ")[0] for line in rounds] == [f"round {n}/{ROUNDS}"
                                                       for n in range(1, ROUNDS + 1)]
    for line, record in zip(rounds, metrics["rounds"], strict=True):
        assert f"val_loss {record['val_loss']:.3f}" in line
        assert f"clients {record['num_clients']}" in line
    best = metrics["best_round"]
    assert lines[-1].startswith(f"finished: {ROUNDS} rounds")
    assert f"best round {best}: val_loss " in lines[-1]
    assert f"test accuracy {metrics['test']['accuracy']:.3f}" in lines[-1]
    assert len(lines) == ROUNDS + 3  # waiting, watching, the rounds, the end
    assert err == ""
    assert "\x1b[" not in out  # plain text in a pipe: no live redrawing


def test_watch_on_a_finished_run_prints_it_and_exits_at_once(followed):
    run_dir, out, _ = followed
    started = time.monotonic()
    result = run_fedge("watch", str(run_dir), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30  # the imports; no waiting on the run
    # The same lines, less the wait; ★ marks the best round as of each line's reading.
    assert unstarred(result.stdout) == unstarred(out)[1:]
    assert result.stdout.count("★ best") == 1
    assert result.stderr == ""


def test_watch_on_no_folder_is_one_error_line(tmp_path):
    result = run_fedge("watch", str(tmp_path / "nowhere"), timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: no run folder at {tmp_path / 'nowhere'}"]
    assert "Traceback" not in result.stderr
