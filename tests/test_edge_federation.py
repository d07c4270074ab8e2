"""A mixed fleet on 127.0.0.1: a fedge server, two `fedge client`s, and one `fedge gateway`
with three `fedge-device`s (C++, ExecuTorch, no Python) and one device that lies."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.models.blob import pack
from fedge.processes import free_port

from conftest import write_flat_csv, write_user_model
from test_deployment import CHILDREN_GONE, FINISHED, MARKER, Deployment, assert_gone_within
from test_gateway import Device

pytest.importorskip("executorch", reason="devices need pip install 'fedge[edge]'")
pytestmark = [pytest.mark.edge, pytest.mark.timeout(600)]

DEVICES = ("dev0", "dev1", "dev2")
DEADLINE = 40  # seconds a gateway round waits for its devices
SLOW = "dev2"  # the device killed mid-round: ExecuTorch's own (slower) kernels, more data


@pytest.fixture(scope="module")
def gateway_files(tmp_path_factory) -> Path:
    """Where the first fleet keeps what `fedge certs`, `fedge tokens` and `fedge
    device-data` wrote for its gateway and devices; later fleets get a copy."""
    return tmp_path_factory.mktemp("gateway-files")


@pytest.fixture
def fleet(tmp_path, device_binary, gateway_files):
    d = Deployment(tmp_path, rounds=3, **{"edge-programs": "true", "round-timeout": 180})
    if (gateway_files / "gwcerts").exists():
        shutil.copytree(gateway_files / "gwcerts", tmp_path / "gwcerts")
        for name in DEVICES:
            shutil.copy2(gateway_files / f"{name}.bin", tmp_path)
    else:
        assert d.fedge("certs", "--host", "localhost", "-o", "gwcerts").returncode == 0
        assert d.fedge("tokens", *DEVICES, "liar", "-o", "gwcerts/tokens").returncode == 0
        # device2.npz, the third client's share, is split among the gateway's devices.
        with np.load(tmp_path / "device2.npz") as share:
            x, y = share["x"], share["y"]
        for i, rows in enumerate(np.array_split(np.arange(len(y)), len(DEVICES))):
            if DEVICES[i] == SLOW:  # many samples: its rounds last long enough to die in one
                rows = np.tile(rows, 8)
            np.savez(tmp_path / f"part{i}.npz", x=x[rows], y=y[rows])
            made = d.fedge("device-data", f"part{i}.npz", "-o", f"{DEVICES[i]}.bin")
            assert made.returncode == 0, made.stderr
        shutil.copytree(tmp_path / "gwcerts", gateway_files / "gwcerts")
        for name in DEVICES:
            shutil.copy2(tmp_path / f"{name}.bin", gateway_files)
    d.gateway_port = free_port()
    d.binary = device_binary
    yield d
    d.stop_all()


def start_device(d: Deployment, name: str, *options: str) -> subprocess.Popen:
    log = open(d.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [str(d.binary), "--gateway", f"https://127.0.0.1:{d.gateway_port}", "--ca",
         "gwcerts/ca.pem", "--token", f"gwcerts/tokens/{name}.token", "--data", f"{name}.bin",
         *options], cwd=d.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, MARKER: f"{d.marker}-{name}"})
    d.processes[name] = process
    return process


def start_gateway(d: Deployment, *options: str) -> subprocess.Popen:
    return d.start("gateway", "gateway", "--server", f"127.0.0.1:{d.port}", "--ca",
                   "certs/ca.pem", "--key", "keys/device2.key", "--listen",
                   f"127.0.0.1:{d.gateway_port}", "--certs", "gwcerts", *options)


def lie_with_nan(d: Deployment, stop: threading.Event) -> None:
    """A device that answers every task with NaN weights until the run is over."""
    device = Device("liar", (d.root / "gwcerts/tokens/liar.token").read_text(),
                    d.gateway_port, d.root / "gwcerts/ca.pem")
    while not stop.is_set():
        try:
            status, task = device.poll(wait=5)
        except OSError:  # the gateway is not up yet, or has gone
            time.sleep(0.5)
            continue
        if status == 410:
            return
        if status == 200:
            task, _ = device.take_task()
            trained = {e["name"]: np.full(e["shape"], np.nan, np.float32)
                       for e in task["manifest"]["state"] if not e["frozen"]}
            sha = task["manifest"]["programs"]["train"]["sha256"]
            device.post_result(task, pack({"program": sha, "num_examples": 100,
                                           "metrics": {}}, trained))


def test_python_clients_and_executorch_devices_train_one_model(fleet):
    d = fleet
    server = d.server()
    clients = [d.client(f"device{i}", f"device{i}.npz") for i in range(2)]
    gateway = start_gateway(d, "--round-deadline", str(DEADLINE))
    devices = {name: start_device(d, name, *(("--kernels", "portable") if name == SLOW
                                             else ())) for name in DEVICES}
    stop = threading.Event()
    liar = threading.Thread(target=lie_with_nan, args=(d, stop), daemon=True)
    liar.start()
    try:
        # dev2 dies in the middle of round 2: after it took the round's task.
        d.wait_for(lambda: "round 2: training" in d.log(SLOW), 300, "dev2 in round 2")
        os.kill(devices[SLOW].pid, signal.SIGKILL)
        assert server.wait(timeout=400) == 0, d.logs()
    finally:
        stop.set()
        liar.join(timeout=30)

    metrics = d.metrics()
    assert metrics["status"] == "finished" and len(metrics["rounds"]) == 3
    assert metrics["test"]["accuracy"] >= 0.8
    assert (d.root / "run" / "model.onnx").exists()
    assert (d.root / "run" / "edge" / "train.pte").exists()
    shares = [r["contributions"] for r in metrics["rounds"]]
    assert all(s["python"]["clients"] == 2 and s["executorch"]["gateways"] == 1
               for s in shares), shares
    assert shares[0]["executorch"]["devices"] == 3  # the liar's NaN was rejected
    assert all(s["executorch"]["devices"] == 2 for s in shares[1:]), shares
    assert all(s["executorch"]["examples"] > 0 for s in shares)

    gateway_log = d.log("gateway")
    assert "liar rejected" in gateway_log and "NaN" in gateway_log
    assert "round 2: 2 of 4 devices" in gateway_log, gateway_log
    assert f"{SLOW} no result" in gateway_log, gateway_log
    assert gateway.wait(timeout=60) == 0, gateway_log
    assert FINISHED in d.log("gateway")  # its last line, once it has exited
    for name in ("dev0", "dev1"):
        assert devices[name].wait(timeout=60) == 0, d.log(name)
    for client in clients:
        assert client.wait(timeout=60) == 0, d.logs()
    for name in ("server", "gateway", "device0", "device1"):
        assert_gone_within(d, name, CHILDREN_GONE)
        assert "Traceback" not in d.log(name), d.log(name)


def test_a_device_with_a_wrong_token_and_a_gateway_without_its_server_say_so(fleet):
    d = fleet
    (d.root / "gwcerts/tokens/dev0.token").write_text("not-the-token")
    gateway = d.start("gateway", "gateway", "--server", f"127.0.0.1:{free_port()}", "--ca",
                      "certs/ca.pem", "--key", "keys/device2.key", "--listen",
                      f"127.0.0.1:{d.gateway_port}", "--certs", "gwcerts",
                      "--join-timeout", "15")
    d.wait_for(lambda: "serving devices" in d.log("gateway"), 60, "the gateway")
    device = start_device(d, "dev0", "--join-timeout", "30")
    assert device.wait(timeout=60) == 2, d.log("dev0")
    last = d.log("dev0").strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused this device's token" in last, last

    assert gateway.wait(timeout=120) == 2, d.log("gateway")
    last = d.log("gateway").strip().splitlines()[-1]
    assert last.startswith("error: gave up joining the federation at"), last
    assert "nothing accepts connections at that address" in last, last
    assert "Traceback" not in d.log("gateway")
    assert_gone_within(d, "gateway", CHILDREN_GONE)



def test_fedbuff_uses_a_gateways_devices_as_one_client_among_others(fleet):
    d = fleet
    two_nodes = {**d.settings, "min-clients": 2}  # a fedge client and the gateway
    (d.root / "run.toml").write_text("".join(f"{k} = {v}\n" for k, v in two_nodes.items()))
    server = d.server("server", "--strategy", "fedbuff", "--concurrency", "2", "--buffer",
                      "1", "--eval-every", "1", devices=("device0", "device2"))
    client = d.client("device0", "device0.npz")
    gateway = start_gateway(d, "--round-deadline", str(DEADLINE))
    devices = {name: start_device(d, name) for name in DEVICES[:2]}
    assert server.wait(timeout=400) == 0, d.logs()

    metrics = d.metrics()
    assert metrics["status"] == "finished" and metrics["asynchronous"]["clock"] == "wall"
    versions = metrics["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    # Each version is one result: the Python client's, or the gateway's average of its
    # two devices'.
    assert {len(v["nodes"]) for v in versions} == {1}
    assert len({v["nodes"][0] for v in versions}) == 2, versions
    shares = [r["contributions"] for r in metrics["rounds"]]
    assert any(s["executorch"]["devices"] == 2 for s in shares), shares
    assert any(s["python"]["clients"] == 1 for s in shares), shares
    assert re.search(r"round \d+: 2 of 2 devices", d.log("gateway")), d.log("gateway")
    for process in (gateway, client, *devices.values()):
        assert process.wait(timeout=60) == 0, d.logs()
    for name in ("server", "gateway", "device0"):
        assert_gone_within(d, name, CHILDREN_GONE)
        assert "Traceback" not in d.log(name), d.log(name)


def test_your_batchnorm_model_trains_on_devices_from_flat_csv_rows(tmp_path, device_binary):
    # The README's own model (BatchNorm: an integer counter among its buffers) and only a
    # gateway: every round's model is what its two devices trained.
    write_user_model(tmp_path)
    d = Deployment(tmp_path, rounds=1, **{"model": '"my_model.py:Net"', "min-clients": 1,
                                          "local-epochs": 1, "edge-programs": "true"})
    try:
        assert d.fedge("certs", "--host", "localhost", "-o", "gwcerts").returncode == 0
        names = DEVICES[:2]
        assert d.fedge("tokens", *names, "-o", "gwcerts/tokens").returncode == 0
        with np.load(tmp_path / "device2.npz") as share:
            x, y = share["x"], share["y"]
        half = len(y) // 2
        # dev0's samples are flat rows of 64 values, as a CSV holds them; the model takes
        # [1, 8, 8] images.
        write_flat_csv(tmp_path / "dev0.csv", x[:half], y[:half])
        np.savez(tmp_path / "dev1.npz", x=x[half:], y=y[half:])
        for name, source in zip(names, ("dev0.csv", "dev1.npz"), strict=True):
            made = d.fedge("device-data", source, "-o", f"{name}.bin")
            assert made.returncode == 0, made.stderr
        d.gateway_port, d.binary = free_port(), device_binary

        server = d.server(devices=("device2",))  # the gateway's key
        # Once the server listens (after exporting the programs), the gateway joins at once.
        d.wait_for(lambda: "SuperLink listening" in d.log("server"), 180, "the server")
        gateway = start_gateway(d, "--round-deadline", "60")
        devices = {name: start_device(d, name) for name in names}
        assert server.wait(timeout=300) == 0, d.logs()

        metrics = d.metrics()
        assert metrics["status"] == "finished", metrics
        (only,) = metrics["rounds"]
        assert only["contributions"]["executorch"]["devices"] == 2, d.log("gateway")
        trained = sum(n - round(0.2 * n) for n in (half, len(y) - half))  # 20 % validate
        assert only["contributions"]["executorch"]["examples"] == trained
        assert only["val_loss"] != metrics["initial"]["val_loss"]  # the devices' model
        gateway_log = d.log("gateway")
        assert "round 1: 2 of 2 devices returned results" in gateway_log, gateway_log
        assert gateway.wait(timeout=60) == 0, gateway_log
        for name, device in devices.items():
            assert device.wait(timeout=60) == 0, d.log(name)
            assert "result accepted" in d.log(name), d.log(name)
        for name in ("server", "gateway"):
            assert "Traceback" not in d.log(name), d.log(name)
            assert_gone_within(d, name, CHILDREN_GONE)
    finally:
        d.stop_all()
