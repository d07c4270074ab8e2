"""Parallel in-process workers: the same run, the same numbers, whichever the worker count;
a dead worker is a round's failures, not a hung run; no worker outlives its run."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import fedge
from fedge.api import SimulationResult
from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.simulations import runner
from fedge.simulations.runner import plan_simulation
from fedge.simulations.workers import WorkerGrid, resolve_workers

from conftest import takes_ctrl_c

SMALL = {"dataset": "digits", "clients": 6, "rounds": 2, "local_epochs": 1, "seed": 3,
         "partition": "iid", "patience": 5}


class RecordingWorkerGrid(WorkerGrid):
    """A WorkerGrid that lets the test reach it, and remembers every worker pid it had."""

    made: ClassVar[list["RecordingWorkerGrid"]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.all_pids = set(self.worker_pids)
        RecordingWorkerGrid.made.append(self)

    def push_messages(self, messages):
        self.all_pids |= set(self.worker_pids)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.all_pids |= set(self.worker_pids)
        return replies


@pytest.fixture
def grids(monkeypatch) -> list[RecordingWorkerGrid]:
    RecordingWorkerGrid.made = []
    monkeypatch.setattr(runner, "WorkerGrid", RecordingWorkerGrid)
    yield RecordingWorkerGrid.made
    for grid in RecordingWorkerGrid.made:
        assert_gone(grid.all_pids)


def assert_gone(pids: set[int]) -> None:
    """No worker process is left, not even as a zombie."""
    assert not multiprocessing.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def per_round(result: SimulationResult) -> list[tuple]:
    return [(r["val_loss"], r["val_accuracy"], r["train_loss"], r["num_clients"],
             r["failures"]) for r in result.rounds]


def run(tmp_path: Path, name: str, **settings) -> SimulationResult:
    return fedge.simulate(out=tmp_path / name, **{**SMALL, **settings})


def test_the_same_seed_gives_the_same_metrics_with_1_2_and_4_workers(tmp_path, grids):
    # This process keeps torch's several threads (more threads sum some losses in another
    # order); its clients must still train as the workers' do, bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        alone = per_round(run(tmp_path, "one", workers=1))
        assert torch.get_num_threads() == max(2, threads)  # the server's own threads
    finally:
        torch.set_num_threads(threads)
    assert not grids  # workers=1 trains in this process, as before
    two = per_round(run(tmp_path, "two", workers=2))
    four = per_round(run(tmp_path, "four", workers=4))
    assert [len(g.all_pids) for g in grids] == [2, 4]
    assert alone == two == four
    assert all(r[3] == 6 and r[4] == 0 for r in two)


def test_a_killed_worker_fails_its_clients_for_one_round_and_the_run_finishes(
        tmp_path, grids):
    killed = []

    def kill_after_round_one(record, best) -> None:
        if record.round == 1:
            pid = grids[0].worker_pids[0]  # nodes 1002, 1004, 1006
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run(tmp_path, "killed", workers=2, rounds=3, on_round=kill_after_round_one)
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert (rounds[0]["failures"], rounds[0]["num_clients"]) == (0, 6)
    assert (rounds[1]["failures"], rounds[1]["num_clients"]) == (3, 3)
    # The worker was restarted for round 3; its failed nodes sit out their quarantine.
    assert rounds[2]["failures"] == 0 and rounds[2]["num_clients"] >= 2
    (grid,) = grids
    assert killed[0] not in grid.worker_pids
    assert len(grid.all_pids) == 3


def test_a_hung_worker_costs_one_round_timeout_and_is_replaced(tmp_path, grids):
    stopped = []

    def stop_after_round_one(record, best) -> None:
        if record.round == 1:
            stopped.append(grids[0].worker_pids[0])
            os.kill(stopped[0], signal.SIGSTOP)  # alive, but answers nothing

    result = run(tmp_path, "hung", workers=2, rounds=3, round_timeout=10,
                 on_round=stop_after_round_one)
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["failures"] + rounds[1]["timeouts"] == 3
    assert rounds[1]["num_clients"] == 3
    assert rounds[2]["failures"] + rounds[2]["timeouts"] == 0
    assert stopped[0] not in grids[0].worker_pids


def test_simulated_devices_keep_their_clock_with_workers(tmp_path, grids):
    # A deadline of 10⁶ simulated seconds that slow clients miss: lateness is decided on
    # the simulated clock, not by how long the workers take in real time.
    result = fedge.simulate(out=tmp_path / "devices", dataset="digits", clients=4, rounds=2,
                            local_epochs=1, partition="iid", patience=10, slow_fraction=0.5,
                            slowdown=1e7, samples_per_second=1.0, round_timeout=1e6,
                            workers=2)
    assert [(r["num_clients"], r["timeouts"], r["failures"]) for r in result.rounds] == [
        (2, 2, 0), (2, 0, 0)]
    assert result.rounds[0]["simulated_seconds"] == 1e6
    assert len(grids) == 1


def test_secure_aggregation_works_with_workers(tmp_path, grids):
    # SecAgg+ keeps each node's keys in its Context between stages: in its worker.
    result = fedge.simulate(out=tmp_path / "secure", dataset="digits", clients=4, rounds=1,
                            local_epochs=1, partition="iid", patience=5, secagg=True,
                            workers=2)
    (record,) = result.rounds
    assert (record["num_clients"], record["failures"]) == (4, 0)
    assert record["val_accuracy"] > 0.3
    assert len(grids) == 1


def test_a_staged_attack_works_with_workers(tmp_path, grids):
    result = run(tmp_path, "attacked", clients=4, rounds=1, byzantine=0.25, attack="nan",
                 workers=2)
    (record,) = result.rounds
    assert (record["rejected"], record["num_clients"], record["failures"]) == (1, 3, 0)


def test_the_worker_count_defaults_to_the_cores_and_refuses_less_than_one(monkeypatch):
    from fedge.simulations import workers

    monkeypatch.setattr(workers, "available_cores", lambda: 8)
    assert resolve_workers(RunConfig(clients=10)) == 8
    assert resolve_workers(RunConfig(clients=10, fraction=0.3)) == 3
    assert resolve_workers(RunConfig(clients=10, fraction=0.1, min_clients=2)) == 2
    assert resolve_workers(RunConfig(clients=10, workers=1)) == 1
    assert resolve_workers(RunConfig(clients=3, workers=16)) == 3
    monkeypatch.setattr(workers, "available_cores", lambda: 1)
    assert resolve_workers(RunConfig(clients=10)) == 1
    with pytest.raises(FedgeError, match="workers must be at least 1"):
        plan_simulation(RunConfig(clients=4, workers=0))


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_ctrl_c_ends_the_run_and_every_worker(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedge", "simulate", "--workers", "2", "--clients", "6",
         "--rounds", "100", "--local-epochs", "1", "--patience", "100", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=takes_ctrl_c,
        start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no round finished in 180 s"
            time.sleep(0.2)
        workers = children_of(process.pid)
        assert process.poll() is None and len(workers) >= 2
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole group gets it
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if running(pid)]
