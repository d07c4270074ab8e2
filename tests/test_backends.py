"""Both simulation backends run the very same ServerApp and ClientApp code."""

import json

import flwr
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedge.client.app import build_client_app
from fedge.config import RunConfig
from fedge.models.registry import spec_from_data
from fedge.simulations.inprocess import FIRST_CLIENT_NODE_ID, InProcessGrid
from fedge.simulations.runner import plan_simulation, simulate

from conftest import path_without_this_python, write_user_model


def test_flower_is_the_version_the_in_process_grid_was_written_for():
    # InProcessGrid sets flwr.supercore.task_identity.TaskIdentity, a Flower internal.
    # If this fails, re-check simulations/inprocess.py against the new Flower first.
    assert flwr.__version__.startswith("1.42."), flwr.__version__
    from flwr.supercore.task_identity import TaskIdentity

    InProcessGrid(build_client_app(lambda context: None), num_nodes=1, run_id=7)
    message = Message(RecordDict(), FIRST_CLIENT_NODE_ID, "train")
    assert (message.metadata.run_id, TaskIdentity.run_id) == (7, 7)


def test_the_supernode_launcher_still_matches_flowers_code():
    # fedge.client.supernode replaces the `time` module of this Flower module to shorten
    # its hard-coded 3 s idle sleep. If this fails, re-check that launcher first.
    import inspect

    from flwr.supernode import start_client_internal

    from fedge.client.supernode import short_sleeps

    source = inspect.getsource(start_client_internal)
    assert start_client_internal.time.sleep is not None
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    fast = short_sleeps(0.01)
    started = fast.monotonic()
    fast.sleep(3)
    assert fast.monotonic() - started < 1.0
    assert fast.time() > 0


@pytest.mark.timeout(180)
def test_a_supernode_whose_server_is_gone_exits_by_itself_saying_why(tmp_path):
    """Flower 1.42's SuperNode hangs for ever once it gives up on a server it had joined;
    the launcher ends it, and prints the reason of each failed connection attempt (Flower
    logs those only at DEBUG). Flower's commands are found with this Python, also when
    its environment's ``bin`` is not on PATH."""
    import os
    import subprocess
    import sys
    import time

    from fedge.client.supernode import LOST_SERVER
    from fedge.processes import Children, free_port
    from fedge.server.superlink import start_superlink

    port = free_port()
    children = Children(env={"FLWR_HOME": str(tmp_path)})
    with children.running():
        superlink = start_superlink(
            children, ["--host", "127.0.0.1", "--port", str(port), "--insecure",
                       "--disable-runtime-dependency-installation"],
            port, tmp_path / "superlink.log", timeout=60)
        supernode = subprocess.Popen(
            [sys.executable, "-m", "fedge.client.supernode", "--superlink",
             f"127.0.0.1:{port}", "--insecure", "--port", str(free_port()),
             "--max-wait-time", "5"],
            env={**os.environ, "FLWR_HOME": str(tmp_path), "PATH": path_without_this_python()},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = []
            for line in supernode.stdout:
                lines.append(line)
                if "SuperNode ID:" in line:
                    break
            assert any("SuperNode ID:" in line for line in lines), "".join(lines)
            children.end(superlink)
            lost = time.monotonic()
            status = supernode.wait(timeout=60)
            assert status == LOST_SERVER
            assert time.monotonic() - lost < 5 + 20  # --max-wait-time, then Flower's last try
            rest = supernode.stdout.read()
            assert "Giving up reconnection" in rest
            assert "fedge: connection attempt failed: [Errno 111] Connection refused" in rest
        finally:
            if supernode.poll() is None:
                supernode.kill()
                supernode.wait(timeout=30)


def test_a_failing_client_becomes_an_error_reply_and_the_round_goes_on():
    def no_data(context):
        if context.node_config["partition-id"] == 0:
            raise RuntimeError("disk unplugged")
        raise ValueError("no samples")

    grid = InProcessGrid(build_client_app(no_data), num_nodes=2)
    spec = spec_from_data("mlp", np.zeros((4, 3), np.float32), num_classes=2, dropout=0.0)
    config = ConfigRecord({"model-spec": spec.to_json()})
    messages = [Message(RecordDict({"config": config}), node, "train")
                for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages))
    assert sorted(r.error.reason for r in replies) == [
        "RuntimeError: disk unplugged", "ValueError: no samples"]
    assert {r.metadata.reply_to_message_id for r in replies} == {
        m.metadata.message_id for m in messages}
    assert FedAvg().aggregate_train(1, replies) == (None, None)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["cnn", "your own"])
def test_ray_backend_runs_the_same_federation_as_the_in_process_backend(tmp_path, model, capfd):
    if model == "your own":  # Ray's workers get it as a program, as devices do
        model = f"{write_user_model(tmp_path / 'src')}:Net"
    config = RunConfig(model=model, clients=3, rounds=2, local_epochs=1, partition="iid",
                       patience=5)
    results = {}
    for backend in ("inprocess", "ray"):
        run_dir = tmp_path / backend
        simulate(plan_simulation(config.updated(**{"backend": backend})), run_dir)
        results[backend] = json.loads((run_dir / "metrics.json").read_text())

    # Flower's supported entry point (a simulation SuperLink), not run_simulation.
    assert "deprecat" not in "".join(capfd.readouterr()).lower()
    inprocess, ray = results["inprocess"], results["ray"]
    assert ray["status"] == "finished" and ray["config"]["backend"] == "ray"
    assert [r["num_clients"] for r in ray["rounds"]] == [3, 3]
    # Ray returns replies in completion order, so sums may differ in the last bits.
    for a, b in zip(inprocess["rounds"], ray["rounds"], strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
