"""Tracking on real components: an MLflow tracking server (SQLite, 127.0.0.1) read back
through MlflowClient, TensorBoard's event files through TensorBoard's own reader, and a
device's own tracking of its local training."""

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from sklearn.datasets import load_digits

from fedge.processes import free_port

from conftest import stop_process_group

pytestmark = pytest.mark.timeout(600)

FAST = ["--clients", "3", "--local-epochs", "1", "--partition", "iid"]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store, which a test may stop and start
    again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=env, start_new_session=True,
            stdout=(self.root / "server.log").open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not up in {timeout} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            stop_process_group(self.process)
        self.process = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(uri: str, name: str):
    tracked = client(uri)
    experiment = tracked.get_experiment_by_name("fedge")
    runs = tracked.search_runs([experiment.experiment_id],
                               filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(uri: str, run_id: str, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client(uri).get_metric_history(run_id, metric)}


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def fedge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedge", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_simulation_is_tracked_in_mlflow_and_tensorboard(tmp_path, mlflow_server):
    run = tmp_path / "fleet"
    result = fedge("simulate", *FAST, "--rounds", "2", "--track",
                   f"mlflow:{mlflow_server.uri}", "--track", "tensorboard", "--out", str(run),
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())

    tracked = only_run(mlflow_server.uri, "fleet")
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["training.lr"] == str(metrics["config"]["lr"])
    assert tracked.data.params["strategy.rounds"] == "2"
    assert tracked.data.tags["fedge.run_dir"] == str(run.resolve())
    assert tracked.data.tags["flwr.version"].startswith("1.42")
    losses = steps(mlflow_server.uri, tracked.info.run_id, "val_loss")
    assert losses == pytest.approx({0: metrics["initial"]["val_loss"],
                                    **{r["round"]: r["val_loss"] for r in metrics["rounds"]}})
    f1 = steps(mlflow_server.uri, tracked.info.run_id, "val_macro_f1")
    assert f1[2] == pytest.approx(metrics["rounds"][1]["val_measures"]["macro_f1"])
    for key in metrics["rounds"][0]["clients"]:  # each client's own report, by its key
        train = steps(mlflow_server.uri, tracked.info.run_id, f"client/{key}/train_loss")
        assert train[1] == pytest.approx(metrics["rounds"][0]["clients"][key]["train_loss"])
    assert set(steps(mlflow_server.uri, tracked.info.run_id, "failures")) == {1, 2}
    artifacts = {a.path for a in client(mlflow_server.uri).list_artifacts(tracked.info.run_id)}
    assert {"model.onnx", "curves.png", "metrics.json", "onnx_report.json"} <= artifacts

    # The ONNX model is an MLflow model of the run, which the registry takes.
    import mlflow

    logged = client(mlflow_server.uri).search_logged_models(
        experiment_ids=[tracked.info.experiment_id],
        filter_string=f"source_run_id = '{tracked.info.run_id}'")
    assert [m.name for m in logged] == ["model"]
    mlflow.set_tracking_uri(mlflow_server.uri)
    version = mlflow.register_model(logged[0].model_uri, "fleet-model")
    assert version.version == "1"

    board = tensorboard_scalars(run / "tensorboard", "val_loss")
    assert board == pytest.approx(losses)


def test_training_goes_on_while_the_tracker_is_down_and_it_catches_up(
        tmp_path, mlflow_server, caplog):
    """The tracking server stops after round 1 and comes back after round 3: no round
    waits for it, and every round reaches it in the end."""
    from fedge import simulate

    def outage(record, best) -> None:
        if record.round == 1:
            mlflow_server.stop()
        elif record.round == 3:
            mlflow_server.start()

    caplog.set_level(logging.WARNING, logger="fedge.tracking")
    result = simulate(out=tmp_path / "outage", clients=3, rounds=4, local_epochs=1,
                      partition="iid", track=[f"mlflow:{mlflow_server.uri}"],
                      on_round=outage)
    assert result.rounds_run == 4
    assert json.loads((result.run_dir / "metrics.json").read_text())["status"] == "finished"
    tracked = only_run(mlflow_server.uri, "outage")
    assert set(steps(mlflow_server.uri, tracked.info.run_id, "val_loss")) == {0, 1, 2, 3, 4}
    assert tracked.info.status == "FINISHED"
    said = [r.getMessage() for r in caplog.records if r.name == "fedge.tracking"]
    assert len([s for s in said if "training goes on, and fedge retries" in s]) == 1, said
    assert len([s for s in said if "is back after" in s]) == 1, said
    assert not [s for s in said if "could not be reached" in s], said


def test_a_tracker_that_never_answers_costs_the_run_nothing_and_is_named(tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    run = tmp_path / "alone"
    result = fedge("simulate", *FAST, "--rounds", "2", "--track", f"mlflow:{nobody}",
                   "--track-timeout", "3", "--out", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert (run / "model.onnx").is_file()
    warnings = [line for line in result.stderr.splitlines() if nobody in line]
    assert len(warnings) == 2, result.stderr
    assert "training goes on, and fedge retries" in warnings[0]
    assert "could not be reached within 3 s of the run's end" in warnings[1]
    assert "round 1 to round 2" in warnings[1] and "the artifacts" in warnings[1]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """The default store: mlruns/ beside the run folder, SQLite and artifacts."""
    from fedge import simulate

    run = tmp_path / "runs" / "long"
    options = {"clients": 3, "local_epochs": 1, "partition": "iid", "out": run,
               "track": ["mlflow", "tensorboard"]}
    simulate(rounds=2, **options)
    (run / "metrics.json").write_text('{"status": "running"}')  # as if interrupted
    simulate(rounds=3, resume=True, **options)

    store = f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}"
    tracked = only_run(store, "long")
    assert tracked.info.status == "FINISHED"
    assert set(steps(store, tracked.info.run_id, "val_loss")) == {0, 1, 2, 3}
    assert tracked.data.params["strategy.rounds"] == "2"  # MLflow keeps a first value
    assert tracked.data.tags["resumed.strategy.rounds"] == "3"
    assert set(tensorboard_scalars(run / "tensorboard", "val_loss")) == {0, 1, 2, 3}


@pytest.mark.parametrize(("track", "says"), [
    ("wandb", "'wandb' is no tracker: mlflow[:URI] or tensorboard[:DIR]"),
    ("mlflow:file:///tmp/x", "MLflow no longer takes file stores"),
    ("tensorboard:", "names no place after the colon"),
])
def test_a_bad_track_value_is_one_error_before_anything_starts(tmp_path, track, says):
    from typer.testing import CliRunner

    from fedge.cli import app

    result = CliRunner().invoke(app, ["simulate", "--track", track, "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], lines
    assert not (tmp_path / "run").exists()


def _train_message(server_round: int) -> RecordDict:
    from fedge.models.registry import build_model, spec_from_data

    x = load_digits().data.astype(np.float32)
    spec = spec_from_data("mlp", x, 10, 0.1)
    return RecordDict({
        "arrays": ArrayRecord(build_model(spec).state_dict()),
        "config": ConfigRecord({"model-spec": spec.to_json(), "local-epochs": 3,
                                "batch-size": 16, "lr": 0.01, "optimizer": "adam",
                                "local-patience": 5, "seed": 0,
                                "server-round": server_round}),
    })


def test_a_device_tracks_its_own_epochs_and_sends_the_server_nothing_more(tmp_path):
    from fedge.client.app import build_trainer
    from fedge.client.data import split_train_val
    from fedge.client.tracking import LocalTracking

    digits = load_digits()
    samples = split_train_val(digits.data[:300].astype(np.float32), digits.target[:300],
                              0.2, seed=0)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    tracking = LocalTracking([f"tensorboard:{tmp_path / 'local_tb'}"], "device", {})
    tracked = build_trainer(lambda c: samples, "cpu", tracking=tracking)
    plain = build_trainer(lambda c: samples, "cpu")
    for server_round in (1, 2):
        message = _train_message(server_round)
        sent, untracked = tracked(message, context), plain(message, context)
        assert dict(sent["metrics"]) == pytest.approx(
            {**dict(untracked["metrics"]), "train_seconds": sent["metrics"]["train_seconds"]})
        assert sent["arrays"].keys() == untracked["arrays"].keys()
    tracking.close()

    epochs = tensorboard_scalars(tmp_path / "local_tb", "local/train_loss")
    assert sorted(epochs) == [1, 2, 3, 4, 5, 6]  # 3 local epochs in each of 2 rounds
    rounds = tensorboard_scalars(tmp_path / "local_tb", "round/train_loss")
    assert rounds[2] == pytest.approx(sent["metrics"]["train_loss"])


def test_a_write_the_tracker_refuses_is_skipped_and_the_rest_goes_on(tmp_path, caplog):
    """MLflow refuses a metric name that would resolve to another one (400): that write
    is skipped with a warning, not retried until the run ends."""
    from fedge.tracking import MlflowSink, Tracker

    caplog.set_level(logging.WARNING, logger="fedge.tracking")
    sink = MlflowSink(None, tmp_path / "store")
    tracker = Tracker(sink, flush_timeout=60)
    tracker.open("refusal", {})
    tracker.write("a name MLflow refuses", lambda: sink.metrics({"a//b": 1.0}, 1))
    tracker.metrics({"val_loss": 0.5}, 1, "round 1")
    tracker.finish("FINISHED")
    assert tracker.close() == []

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracked = only_run(store, "refusal")
    assert tracked.info.status == "FINISHED" and tracked.data.metrics == {"val_loss": 0.5}
    said = [r.getMessage() for r in caplog.records if r.name == "fedge.tracking"]
    assert len(said) == 1 and "refused a name MLflow refuses" in said[0], said
