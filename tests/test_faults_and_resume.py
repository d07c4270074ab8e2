"""Rounds survive failing, silent and missing clients; interrupted runs resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedge.client.app import build_client_app
from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.server.federation import Federation
from fedge.server.grid import NotEnoughClients, RoundStats
from fedge.server.rounds import RoundTracker
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation

from conftest import write_user_model

SMALL = RunConfig(clients=4, rounds=3, local_epochs=1, partition="iid", patience=10,
                  round_timeout=2.0)


def federation(tmp_path, config: RunConfig = SMALL) -> tuple[Federation, object]:
    plan = plan_simulation(config)
    return Federation(plan.config, plan.server_data, tmp_path), plan.clients


def failing_for(partition: int, load_data):
    def load(context):
        if context.node_config["partition-id"] == partition:
            raise OSError("sensor storage unreadable")
        return load_data(context)
    return load


class PartitionedGrid(InProcessGrid):
    """A network in which messages to some nodes are lost: they never answer."""

    def __init__(self, client_app, num_nodes: int, unreachable: set[int]) -> None:
        super().__init__(client_app, num_nodes)
        self.unreachable, self.sampled = unreachable, []

    def push_messages(self, messages):
        messages = list(messages)
        self.sampled.append(sorted(m.metadata.dst_node_id for m in messages))
        ids = []
        for message in messages:
            if message.metadata.dst_node_id in self.unreachable:
                message.metadata.__dict__["_message_id"] = f"lost-{id(message)}"
                ids.append(message.metadata.message_id)
            else:
                ids.extend(super().push_messages([message]))
        return ids


def test_a_failing_client_is_counted_and_the_run_completes(tmp_path):
    run, clients = federation(tmp_path)
    app = build_client_app(failing_for(0, clients.local_data))
    outcome = run.run(InProcessGrid(app, SMALL.strategy.clients))
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    # the failed node sits out the next rounds instead of failing them again
    assert [(r["num_clients"], r["failures"], r["timeouts"]) for r in rounds] == [
        (3, 1, 0), (3, 0, 0), (3, 0, 0)]
    assert outcome.rounds_run == 3 and (tmp_path / "model.onnx").exists()


def test_a_silent_client_times_out_is_counted_and_is_not_sampled_again_soon(tmp_path):
    run, clients = federation(tmp_path)
    grid = PartitionedGrid(build_client_app(clients.local_data), SMALL.strategy.clients,
                           unreachable={1001})
    run.run(grid)
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [(r["num_clients"], r["timeouts"]) for r in rounds] == [(3, 1), (3, 0), (3, 0)]
    assert all(1001 not in sampled for sampled in grid.sampled[1:])


def test_a_round_with_too_few_results_keeps_the_global_model(tmp_path):
    run, clients = federation(tmp_path, SMALL.updated(**{"min_results": 4}))
    with pytest.raises(FedgeError, match="none of the 3 rounds aggregated an update"):
        run.run(InProcessGrid(build_client_app(failing_for(2, clients.local_data)), 4))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["num_clients"] for r in metrics["rounds"]] == [0, 0, 0]
    assert {r["val_loss"] for r in metrics["rounds"]} == {metrics["initial"]["val_loss"]}


# Trains to NaN on every client (its train-mode forward), evaluates fine on the server.
UNTRAINABLE_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.flatten(1) / 16.0)
        return logits * float("nan") if self.training else logits
'''


def test_a_run_in_which_no_client_can_train_ends_with_an_error_and_no_model(tmp_path):
    from typer.testing import CliRunner

    from fedge.cli import app

    model = write_user_model(tmp_path, UNTRAINABLE_MODEL)
    run_dir = tmp_path / "run"
    args = ["simulate", "--model", f"{model}:Net", "--clients", "3", "--rounds", "6",
            "--local-epochs", "1", "--workers", "1", "--patience", "3", "--out", str(run_dir)]
    result = subprocess.run([sys.executable, "-m", "fedge", *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no client could train" in errors[0]
    assert "the training loss became nan" in errors[0]  # the clients' own reason
    assert "Traceback" not in result.stderr and "★ best" not in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # patience 3 ends it: rounds that aggregate nothing never improve
    assert [r["num_clients"] for r in metrics["rounds"]] == [0, 0, 0]
    assert metrics["status"] == "failed" and metrics["best_round"] is None
    assert metrics["error"] in errors[0]
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "best.pt").exists()

    again = CliRunner().invoke(app, [*args, "--resume"])  # in this process
    assert again.exit_code == 2 and "cannot resume: the run in" in again.stderr
    assert "failed (no client could train" in again.stderr


def test_a_round_that_aggregated_nothing_is_never_the_best_round(tmp_path):
    plan = plan_simulation(SMALL)
    data = plan.server_data
    run = Federation(plan.config, data, tmp_path)
    tracker = RoundTracker(run.spec, data.val_x, data.val_y, patience=5, min_delta=0.0,
                           on_round=lambda *args: None, round_stats=RoundStats)
    model = ArrayRecord(run.start.state)
    tracker.evaluate(0, model)
    tracker.evaluate(1, model)  # no reply reached aggregation: the same model again
    assert tracker.history[-1].num_clients == 0 and tracker.best_round is None
    reply = RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": 10})})
    tracker.aggregate_train_metrics([reply], "num-examples")
    tracker.evaluate(2, model)
    assert tracker.best_round == 2
    assert tracker.aggregated_rounds == 1


def test_too_few_connected_clients_end_the_run_after_the_join_timeout(tmp_path):
    config = SMALL.updated(**{"min_clients": 3, "join_timeout": 1.0})
    run, clients = federation(tmp_path, config)
    with pytest.raises(NotEnoughClients, match="only 2 of the 3 clients"):
        run.run(InProcessGrid(build_client_app(clients.local_data), num_nodes=2))
    assert isinstance(NotEnoughClients("x"), FedgeError)


def _fedge_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_killed_run_resumes_after_its_last_round_and_records_every_round_once(tmp_path):
    run_dir = str(tmp_path / "run")
    args = ["simulate", "--out", run_dir, "--clients", "3", "--rounds", "5",
            "--local-epochs", "1", "--partition", "iid", "--patience", "10"]
    process = _fedge_process(*args)
    try:
        for line in process.stdout:
            if line.startswith("round   2/5"):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        process.kill()
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert before["status"] == "running"
    completed = len(before["rounds"])
    assert completed >= 2

    result = subprocess.run([sys.executable, "-m", "fedge", *args, "--resume"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"round {completed + 1:>3}/5" in result.stdout
    assert "round   1/5" not in result.stdout
    after = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert after["status"] == "finished"
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3, 4, 5]
    assert after["rounds"][:completed] == before["rounds"]


def test_resume_refuses_changed_settings_and_finished_runs(tmp_path):
    from typer.testing import CliRunner

    from fedge.cli import app

    args = ["simulate", "--out", str(tmp_path), "--clients", "3", "--rounds", "1",
            "--local-epochs", "1"]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "already finished" in result.stderr
    (tmp_path / "metrics.json").write_text('{"status": "running"}')
    result = CliRunner().invoke(app, [*args, "--lr", "0.5", "--resume"])
    assert result.exit_code == 2 and "made with other settings (lr=0.003)" in result.stderr


def test_a_checkpoint_that_holds_fedadams_default_server_lr_resumes(tmp_path):
    # fedge wrote server_lr 0.1 into every config before server_lr had a default per
    # strategy (fedbuff's η_g is 1.0); such a run still resumes.
    import torch
    from typer.testing import CliRunner

    from fedge.cli import app

    args = ["simulate", "--out", str(tmp_path), "--clients", "3", "--local-epochs", "1",
            "--strategy", "fedadam"]
    assert CliRunner().invoke(app, [*args, "--rounds", "1"]).exit_code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["server_lr"] is None
    checkpoint["config"]["server_lr"] = 0.1
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    result = CliRunner().invoke(app, [*args, "--rounds", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert [r["round"] for r in json.loads((tmp_path / "metrics.json").read_text())[
        "rounds"]] == [1, 2]
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))
    changed = CliRunner().invoke(app, [*args, "--server-lr", "0.5", "--resume"])
    assert changed.exit_code == 2 and "server_lr=0.1" in changed.stderr
