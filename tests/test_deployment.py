"""Real processes on 127.0.0.1: a fedge server, fedge clients, Flower's Deployment Engine."""

import json
import os
import signal
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedge.client.app import build_trainer
from fedge.client.data import split_train_val
from fedge.client.relay import AUTHKEY_KEY, TrainerFailed, relay, serve_trainer
from fedge.models.registry import build_model, spec_from_data
from fedge.processes import free_port
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices

pytestmark = pytest.mark.timeout(600)


def _train_message(seed: int = 0) -> tuple[RecordDict, Context]:
    digits = load_dataset("digits")
    spec = spec_from_data("cnn", digits.x, 10, dropout=0.1)
    content = RecordDict({
        "arrays": ArrayRecord(build_model(spec).state_dict()),
        "config": ConfigRecord({"model-spec": spec.to_json(), "local-epochs": 1,
                                "batch-size": 16, "lr": 0.01, "optimizer": "adam",
                                "local-patience": 1, "seed": seed, "server-round": 1}),
    })
    return content, Context(run_id=1, node_id=11, node_config={}, state=RecordDict(),
                            run_config={})


def _device_samples(context: Context):
    digits = load_dataset("digits")
    return split_train_val(digits.x[:200], digits.y[:200], val_fraction=0.2, seed=0)


def test_the_clientapp_flower_starts_for_each_message_does_not_import_torch():
    code = "import sys, fedge.client.relay; assert 'torch' not in sys.modules, 'torch'"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_relayed_message_is_trained_exactly_as_in_process(tmp_path):
    trainer = build_trainer(_device_samples, device="cpu")
    content, context = _train_message()
    with serve_trainer(trainer, tmp_path) as entries:
        context.node_config.update(entries)
        relayed, direct = relay(content, context), trainer(content, context)
    assert not (tmp_path / "trainer.sock").exists()  # cleaned up with the client

    assert relayed["metrics"]["num-examples"] == direct["metrics"]["num-examples"] == 160
    for a, b in zip(relayed["arrays"].to_numpy_ndarrays(),
                    direct["arrays"].to_numpy_ndarrays(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_warm_trainer_answers_only_its_own_device_and_reports_failures(tmp_path):
    def broken(content: RecordDict, context: Context) -> RecordDict:
        raise ValueError("local labels must lie in 0..9")

    content, context = _train_message()
    with serve_trainer(broken, tmp_path) as entries:
        context.node_config.update(entries)
        with pytest.raises(TrainerFailed, match=r"local labels must lie in 0\.\.9"):
            relay(content, context)

        (tmp_path / "other.key").write_bytes(b"not the device's key")
        context.node_config[AUTHKEY_KEY] = str(tmp_path / "other.key")
        with pytest.raises(AuthenticationError):
            relay(content, context)
        context.node_config[AUTHKEY_KEY] = entries[AUTHKEY_KEY]  # it still serves its device
        with pytest.raises(TrainerFailed):
            relay(content, context)


class Deployment:
    """Files a server operator and three device owners would have, and their processes."""

    def __init__(self, root: Path, rounds: int, **settings: object) -> None:
        self.root, self.port = root, free_port()
        self.processes: list[subprocess.Popen] = []
        split = split_federated(load_dataset("digits"), seed=0)
        np.savez(root / "val.npz", x=split.server_val[0], y=split.server_val[1])
        np.savez(root / "test.npz", x=split.test[0], y=split.test[1])
        x, y = split.clients
        for i, rows in enumerate(partition_indices(y, 3, PartitionSpec.parse("iid"), 0)):
            np.savez(root / f"device{i}.npz", x=x[rows], y=y[rows])
        toml = {"model": '"cnn"', "rounds": rounds, "local-epochs": 2, "min-clients": 3,
                "patience": 10, "round-timeout": 60, **settings}
        (root / "run.toml").write_text("".join(f"{k} = {v}\n" for k, v in toml.items()))
        assert self.fedge("certs", "--host", "localhost", "-o", "certs").returncode == 0
        for name in ("device0", "device1", "device2", "stranger"):
            assert self.fedge("keys", "--name", name, "-o", "keys").returncode == 0

    def fedge(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedge", *args], cwd=self.root,
                              capture_output=True, text=True, timeout=60)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "fedge", *args], cwd=self.root,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def server(self) -> subprocess.Popen:
        keys = [a for i in range(3) for a in ("--authorized-key", f"keys/device{i}.pub")]
        return self.start("server", "server", "--val-data", "val.npz", "--test-data",
                          "test.npz", "--config", "run.toml", "--certs", "certs", *keys,
                          "--host", "127.0.0.1", "--port", str(self.port), "-o", "run")

    def client(self, name: str, data: str, *options: str) -> subprocess.Popen:
        if "--insecure" not in options:
            options = ("--ca", "certs/ca.pem", "--key", f"keys/{name}.key", *options)
        return self.start(name, "client", "--server", f"127.0.0.1:{self.port}",
                          "--data", data, *options)

    def metrics(self) -> dict:
        path = self.root / "run" / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {"rounds": []}

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n" + self.logs()
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL a command with everything it started, as a crash of its machine would."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(process)


def _json_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith('{"time"')]


@pytest.fixture
def deployment(tmp_path):
    created = []

    def make(rounds: int, **settings: object) -> Deployment:
        created.append(Deployment(tmp_path, rounds, **settings))
        return created[-1]

    yield make
    for d in created:
        d.stop_all()


def test_tls_federation_with_node_auth_completes_and_refuses_strangers(deployment):
    d = deployment(rounds=3)
    (d.root / "broken.csv").write_text("label,a,b\n1,2\n")
    server = d.server()
    clients = [d.client(f"device{i}", f"device{i}.npz") for i in range(3)]
    broken = d.client("device0", "broken.csv")
    stranger = d.client("stranger", "device0.npz", "--join-timeout", "20")
    plaintext = d.client("plaintext", "device1.npz", "--insecure", "--join-timeout", "20")

    assert broken.wait(timeout=60) == 2
    assert "error:" in d.log("device0") and "broken.csv" in d.log("device0")
    assert server.wait(timeout=400) == 0, d.logs()

    metrics = d.metrics()
    assert metrics["status"] == "finished"
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3, 3]
    assert metrics["test"]["accuracy"] >= 0.8
    report = json.loads((d.root / "run" / "onnx_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and (d.root / "run" / "model.onnx").exists()
    # The stranger's key was never registered and the plaintext client cannot speak TLS:
    # both give up with a clear message, and the server logged the stranger's attempts.
    for refused in (stranger, plaintext):
        assert refused.wait(timeout=120) == 2
    assert "gave up joining the federation" in d.log("stranger")
    assert "gave up joining the federation" in d.log("plaintext")
    assert "No SuperNode found with the given public key" in (
        d.root / "run" / "superlink.log").read_text()
    assert all(process.poll() is None for process in clients)


def test_a_client_killed_mid_run_does_not_stop_the_run(deployment):
    d = deployment(rounds=4, **{"min-clients": 2, "round-timeout": 30})
    server = d.server()
    clients = [d.client(f"device{i}", f"device{i}.npz") for i in range(3)]
    d.wait_for(lambda: len(d.metrics()["rounds"]) >= 1, 300, "round 1")
    d.kill(clients[0])

    assert server.wait(timeout=400) == 0, d.logs()
    rounds = d.metrics()["rounds"]
    assert d.metrics()["status"] == "finished" and len(rounds) == 4
    assert rounds[0]["num_clients"] == 3
    assert all(r["num_clients"] == 2 for r in rounds[2:])
    assert sum(r["failures"] + r["timeouts"] for r in rounds) >= 1


def test_a_killed_server_restarted_on_its_run_folder_resumes(deployment):
    d = deployment(rounds=4)
    server = d.server()
    for i in range(3):
        d.client(f"device{i}", f"device{i}.npz")
    d.wait_for(lambda: len(d.metrics()["rounds"]) >= 2, 300, "round 2")
    d.kill(server)
    before = d.metrics()["rounds"]

    restarted = d.server()
    assert restarted.wait(timeout=500) == 0, d.logs()
    metrics = d.metrics()
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    assert metrics["rounds"][: len(before)] == before
    assert "resuming after round" in d.log("server")


def test_the_server_reports_health_and_shuts_down_cleanly_on_sigterm(deployment):
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedge.server.checkpoint import load_checkpoint

    d = deployment(rounds=20)
    health_port = free_port()
    server = d.start("server", "server", "--val-data", "val.npz", "--config", "run.toml",
                     "--certs", "certs", *(a for i in range(3) for a in (
                         "--authorized-key", f"keys/device{i}.pub")),
                     "--host", "127.0.0.1", "--port", str(d.port), "--health-port",
                     str(health_port), "-o", "run", "--log-format", "json")

    def serving() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    d.wait_for(serving, 60, "the health endpoint")
    for i in range(3):
        d.client(f"device{i}", f"device{i}.npz")
    # fedge's log lines are JSON objects a log collector can parse, also those the
    # ServerApp's process logs (Flower streams them to `fedge server`'s output).
    def logged_round_1() -> bool:
        return any(line["logger"] == "fedge.server" and line["message"].startswith("round 1:")
                   for line in map(json.loads, _json_lines(d.log("server"))))

    d.wait_for(logged_round_1, 300, "round 1 in the server's log")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 130

    checkpoint = load_checkpoint(d.root / "run" / "checkpoint.pt")
    assert checkpoint.round == len(d.metrics()["rounds"]) >= 1
    assert d.metrics()["status"] == "running"
    with socket.socket() as sock:  # the SuperLink is gone and its port is free again
        sock.bind(("127.0.0.1", d.port))
