"""Real processes on 127.0.0.1: a fedge server, fedge clients, Flower's Deployment Engine."""

import atexit
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from multiprocessing import AuthenticationError
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from sklearn.datasets import load_diabetes

from fedge.client.app import build_trainer
from fedge.client.data import split_train_val
from fedge.client.deployment import ENDED_GRACE, SuperNodeWatch
from fedge.client.relay import (
    AUTHKEY_KEY,
    NOT_FEDGE_CLIENT,
    TrainerFailed,
    relay,
    serve_trainer,
)
from fedge.client.relay import app as relay_app
from fedge.models.registry import build_model, spec_from_data
from fedge.processes import STOP_BOUND, free_port, plain
from fedge.protocol import RUN_FINISHED
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.inprocess import FIRST_CLIENT_NODE_ID, InProcessGrid
from fedge.simulations.partition import PartitionSpec, partition_indices

from conftest import path_without_this_python, run_python, write_user_model

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


def test_the_relay_with_no_fedge_client_behind_it_says_what_the_federation_expects():
    # A node whose config names no trainer: Flower's plain SuperNode running the app.
    grid = InProcessGrid(relay_app, 1)
    content, _ = _train_message()
    (reply,) = grid.send_and_receive([Message(content, FIRST_CLIENT_NODE_ID, "train")])
    assert reply.has_error() and reply.error.reason == NOT_FEDGE_CLIENT
    farewell = RecordDict({"config": ConfigRecord({"summary": "best round 1"})})
    (answer,) = grid.send_and_receive([Message(farewell, FIRST_CLIENT_NODE_ID, RUN_FINISHED)])
    assert not answer.has_error()


# What the ServerApp's process does with --edge-programs: export the devices' programs,
# then log each round through Flower's logger.
EXPORT_THEN_LOG = """
import logging
from flwr.common.logger import log
from fedge.models.edge import export_edge_programs
from fedge.models.registry import build_model, spec_from_data
from fedge.simulations.datasets import load_dataset

data = load_dataset("breast_cancer")
spec = spec_from_data("mlp", data.x, data.num_classes, dropout=0.1)
export_edge_programs(build_model(spec), spec, data.x[:40], data.y[:40], max_batch=8)
log(logging.INFO, "a line Flower logs after the export")
"""


@pytest.mark.edge
def test_exporting_device_programs_leaves_the_servers_output_as_it_was():
    pytest.importorskip("executorch", reason="the device programs need pip install "
                                             "'fedge[edge]'")
    result = run_python(EXPORT_THEN_LOG, timeout=300)
    assert result.returncode == 0, result.stderr
    # No line of ExecuTorch's, torch's or torchao's, and Flower's line once.
    lines = [plain(line) for line in (result.stdout + result.stderr).splitlines()
             if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("a line Flower logs after the export"), lines


# Where `fedge certs` and `fedge keys` wrote a deployment's credentials, by server host.
_CREDENTIALS: dict[str, Path] = {}


class Deployment:
    """Files a server operator and three device owners would have, and their processes.

    Every process a test starts carries a marker in its environment, which Flower's
    processes inherit: :meth:`alive` finds whatever is left of it."""

    host = "127.0.0.1"  # where the server listens, and the clients dial it

    def __init__(self, root: Path, rounds: int, **settings: object) -> None:
        self.root, self.port = root, free_port()
        self.metrics_port = free_port()
        self.scraped: MetricsScraper | None = None  # `fedge server --metrics-port`'s
        self.processes: dict[str, subprocess.Popen] = {}
        self.marker = f"fedge-test-{uuid.uuid4().hex}"
        split = split_federated(load_dataset("digits"), seed=0)
        np.savez(root / "val.npz", x=split.server_val[0], y=split.server_val[1])
        np.savez(root / "test.npz", x=split.test[0], y=split.test[1])
        x, y = split.clients
        for i, rows in enumerate(partition_indices(y, 3, PartitionSpec.parse("iid"), 0)):
            np.savez(root / f"device{i}.npz", x=x[rows], y=y[rows])
        self.settings = {"model": '"cnn"', "rounds": rounds, "local-epochs": 2,
                         "min-clients": 3, "patience": 10, "round-timeout": 60, **settings}
        (root / "run.toml").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        self.credentials()

    def credentials(self) -> None:
        """certs/ (the server's, for ``host``) and keys/ (the devices' and a stranger's),
        as `fedge certs` and `fedge keys` write them: run once per host and test session,
        and copied into every later deployment's folder."""
        made = _CREDENTIALS.get(self.host)
        if made is None:
            assert self.fedge("certs", "--host", "localhost", "--host", self.host,
                              "-o", "certs").returncode == 0
            for name in ("device0", "device1", "device2", "stranger"):
                assert self.fedge("keys", "--name", name, "-o", "keys").returncode == 0
            made = Path(tempfile.mkdtemp(prefix="fedge-test-credentials-"))
            atexit.register(shutil.rmtree, made, ignore_errors=True)
            for folder in ("certs", "keys"):
                shutil.copytree(self.root / folder, made / folder)
            _CREDENTIALS[self.host] = made
        else:
            for folder in ("certs", "keys"):
                shutil.copytree(made / folder, self.root / folder)

    def fedge(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedge", *args], cwd=self.root,
                              capture_output=True, text=True, timeout=60)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([*self.launcher(name), sys.executable, "-m", "fedge",
                                    *args], cwd=self.root,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   env={**os.environ, MARKER: f"{self.marker}-{name}"})
        self.processes[name] = process
        return process

    def launcher(self, name: str) -> list[str]:
        """What runs process ``name`` on its own machine: here, nothing (this one)."""
        return []

    def server(self, name: str = "server", *options: str,
               devices: tuple[str, ...] = ("device0", "device1", "device2")) -> subprocess.Popen:
        """`fedge server`, which knows the keys of ``devices`` (registering one with the
        SuperLink takes a `flwr` command of its own: seconds)."""
        keys = [a for device in devices for a in ("--authorized-key", f"keys/{device}.pub")]
        return self.start(name, "server", "--val-data", "val.npz", "--test-data",
                          "test.npz", "--config", "run.toml", "--certs", "certs", *keys,
                          "--host", self.host, "--port", str(self.port), "-o", "run",
                          *options)

    def client(self, name: str, data: str, *options: str, key: str | None = None,
               server: str | None = None) -> subprocess.Popen:
        if "--insecure" not in options:
            options = ("--ca", "certs/ca.pem", "--key", f"keys/{key or name}.key", *options)
        return self.start(name, "client", "--server", server or f"{self.host}:{self.port}",
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

    def node_id(self, name: str) -> int:
        """The node id the server gave a client, as the client logged it."""
        return int(re.findall(r"joined the federation at \S+ as node (\d+)",
                              self.log(name))[-1])

    def alive(self, name: str) -> list[int]:
        """Every process that ``name`` started, or is, that still runs."""
        return marked_processes(f"{self.marker}-{name}")

    def kill(self, name: str) -> None:
        """SIGKILL a command with everything it started, as a crash of its machine would."""
        for pid in [self.processes[name].pid, *self.alive(name)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(name)
        for name in self.processes:  # nothing a test started may outlive it
            for pid in self.alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


MARKER = "FEDGE_TEST_PROCESS"


def marked_processes(marker: str) -> list[int]:
    """Running processes whose environment holds ``MARKER=marker`` (zombies excluded)."""
    found = []
    needle = f"{MARKER}={marker}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


def assert_gone_within(d: Deployment, name: str, seconds: float) -> None:
    """Nothing ``name`` started is left ``seconds`` after it stopped."""
    deadline = time.monotonic() + seconds
    while d.alive(name):
        assert time.monotonic() < deadline, f"{name} left processes running: {d.alive(name)}"
        time.sleep(0.2)


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


CHILDREN_GONE = 15.0  # seconds: fedge promises ~8 s (its guard's 5 s grace, then SIGKILL)
FINISHED = "the federation's run finished (best round"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One TLS federation run to its end, which the next two tests read: three devices
    train the operator's own model (its source is on the server's machine only), and a
    client whose data is broken leaves at once."""
    d = Deployment(tmp_path_factory.mktemp("finished"), rounds=3,
                   model='"operator/my_model.py:Net"')
    try:
        write_user_model(d.root / "operator")
        (d.root / "broken.csv").write_text("label,a,b\n1,2\n")
        metrics = (["--metrics-port", str(d.metrics_port)]
                   if importlib.util.find_spec("prometheus_client") else [])
        server = d.server("server", *metrics, "--track", "tensorboard")
        scraper = MetricsScraper(d.metrics_port, server) if metrics else None
        # device0 keeps its own tracking of its local training, on the device.
        clients = [d.client(f"device{i}", f"device{i}.npz",
                            *(["--track", "tensorboard:device0_tb"] if i == 0 else []))
                   for i in range(3)]
        broken = d.client("broken", "broken.csv", key="device0")
        with contextlib.suppress(subprocess.TimeoutExpired):  # the tests say what is wrong
            broken.wait(timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=400)
        if scraper is not None:
            scraper.join(timeout=30)
        d.scraped = scraper
        yield d, server, clients, broken
    finally:
        d.stop_all()


def test_tls_federation_completes_and_every_client_leaves_when_the_run_finishes(finished_run):
    d, server, clients, broken = finished_run
    assert broken.returncode == 2, d.log("broken")
    assert "error:" in d.log("broken") and "broken.csv" in d.log("broken")
    assert server.returncode == 0, d.logs()
    assert "run finished: run" in d.log("server")

    metrics = d.metrics()
    assert metrics["status"] == "finished"
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3, 3]
    assert metrics["test"]["accuracy"] >= 0.8
    report = json.loads((d.root / "run" / "onnx_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and (d.root / "run" / "model.onnx").exists()
    # The server's last message tells every client that the run is over: each leaves,
    # with status 0, and takes its SuperNode and Flower's helpers with it.
    for i, client in enumerate(clients):
        assert client.wait(timeout=60) == 0, d.logs()
        assert FINISHED in d.log(f"device{i}")
        assert_gone_within(d, f"device{i}", CHILDREN_GONE)
    assert_gone_within(d, "server", CHILDREN_GONE)
    for name in ("server", "device0", "device1", "device2", "broken"):
        assert "Traceback" not in d.log(name), d.log(name)


class MetricsScraper(threading.Thread):
    """Scrapes `fedge server --metrics-port`'s /metrics twice a second while ``server``
    runs, parsing each scrape with prometheus_client's parser: ``scrapes`` holds each
    sample by name (labels in braces), ``errors`` what did not parse."""

    def __init__(self, port: int, server: subprocess.Popen) -> None:
        super().__init__(daemon=True, name="metrics scraper")
        self.url, self.server = f"http://127.0.0.1:{port}/metrics", server
        self.scrapes: list[dict[str, float]] = []
        self.errors: list[str] = []
        self.start()

    def run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + 500
        while self.server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:  # not listening yet, or no longer
                time.sleep(0.5)
                continue
            try:
                self.scrapes.append({
                    sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(
                        sample.labels.items())) + "}" if sample.labels else ""): sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples})
            except ValueError as error:
                self.errors.append(f"{error}: {text}")
            time.sleep(0.5)


def test_the_servers_metrics_port_serves_prometheus_while_the_run_goes_on(finished_run):
    d, server, _, _ = finished_run
    if d.scraped is None:
        pytest.skip("--metrics-port needs prometheus_client (pip install 'fedge[tracking]')")
    assert server.returncode == 0, d.logs()
    scrapes, errors = d.scraped.scrapes, d.scraped.errors
    assert errors == [] and len(scrapes) > 5, (errors, len(scrapes))
    # Counters never go down, and every round was counted as it completed.
    for name in ("fedge_rounds_completed_total", "fedge_client_failures_total",
                 "fedge_received_bytes_total"):
        values = [scrape[name] for scrape in scrapes]
        assert values == sorted(values), (name, values)
    assert [scrape["fedge_rounds_completed_total"] for scrape in scrapes][-1] == 3
    assert any(scrape['fedge_phase{phase="training"}'] == 1 for scrape in scrapes)
    # The last scrape while the SuperLink still ran: the run as it ended.
    last = [scrape for scrape in scrapes if scrape["fedge_superlink_up"] == 1][-1]
    assert last["fedge_rounds_completed_total"] == last["fedge_round"] == 3
    assert last["fedge_clients_connected"] == 3
    assert last["fedge_client_failures_total"] == last["fedge_client_timeouts_total"] == 0
    assert last["fedge_received_bytes_total"] > 0
    metrics = d.metrics()
    assert last["fedge_validation_loss"] == pytest.approx(metrics["rounds"][-1]["val_loss"])
    assert last['fedge_validation_measure{measure="accuracy"}'] == pytest.approx(
        metrics["rounds"][-1]["val_measures"]["accuracy"])
    info = [name for name in last if name.startswith("fedge_run_info{")]
    assert len(info) == 1 and 'strategy="fedavg"' in info[0] and 'unit="round"' in info[0]
    with pytest.raises(OSError):  # served until the server exited, not after
        urllib.request.urlopen(d.scraped.url, timeout=5)


def test_a_loopback_deployment_trains_your_model_on_devices_without_its_source(finished_run):
    d, server, clients, _ = finished_run
    assert server.returncode == 0, d.logs()
    for i, client in enumerate(clients):
        assert client.wait(timeout=60) == 0, d.logs()
        assert_gone_within(d, f"device{i}", 15)

    metrics = d.metrics()
    assert metrics["model"]["origin"] == f"{d.root / 'operator' / 'my_model.py'}:Net"
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3, 3]
    assert metrics["test"]["accuracy"] > 0.5
    importers = set((d.root / "operator" / "imports.log").read_text().split())
    assert importers and all(marker.endswith("-server") for marker in importers), importers


def test_the_server_and_a_device_track_what_each_of_them_sees(finished_run):
    """`fedge server --track tensorboard`: the federation's rounds in the run folder;
    `fedge client --track tensorboard:DIR`: that device's local epochs, on the device."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, server, clients, _ = finished_run
    assert server.returncode == 0 and clients[0].wait(timeout=60) == 0, d.logs()

    def scalars(folder: Path, tag: str) -> dict[int, float]:
        events = EventAccumulator(str(folder))
        events.Reload()
        return {e.step: e.value for e in events.Scalars(tag)}

    metrics = d.metrics()
    federation = scalars(d.root / "run" / "tensorboard", "val_loss")
    assert federation == pytest.approx({0: metrics["initial"]["val_loss"],
                                        **{r["round"]: r["val_loss"] for r in metrics["rounds"]}})
    device = scalars(d.root / "device0_tb", "round/train_loss")
    assert set(device) == {1, 2, 3}
    epochs = scalars(d.root / "device0_tb", "local/train_loss")
    assert len(epochs) >= 3 and max(epochs) == len(epochs)  # every epoch of every round


@pytest.mark.parametrize(("tls", "cause"), [
    (False, "the server speaks TLS: give its ca.pem with --ca instead of --insecure"),
    (True, "the connection to the server was cut (an unreliable network, or the server "
           "stopped)"),
])
def test_a_cut_connection_is_named_by_what_the_client_dialled(tls, cause):
    """Flower says the same when a plaintext client meets a TLS server and when a lossy
    link cuts a TLS client's request; only the first is the client's settings."""
    watch = SuperNodeWatch(tls=tls)
    watch("WARNING :  Connection attempt failed, retrying in 2.13 seconds: "
          "Server disconnected without sending a response.")
    assert watch.cause == cause


JOIN_PATIENCE = 30  # seconds each client below keeps trying to join


def test_joining_clients_name_what_went_wrong_and_give_up_in_time(deployment, tmp_path):
    d = deployment(rounds=3, **{"join-timeout": 300})
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    assert d.fedge("certs", "--host", "localhost", "-o", str(other_ca)).returncode == 0
    server = d.server()
    d.wait_for(lambda: "SuperLink listening" in d.log("server"), 60, "the SuperLink")
    # Long enough for five clients starting at once on 2 cores to hear why they cannot join.
    patience = ("--join-timeout", str(JOIN_PATIENCE))
    causes = {
        "stranger": (d.client("stranger", "device0.npz", *patience),
                     "the server does not know this device's key"),
        "wrong-ca": (d.client("wrong-ca", "device0.npz", "--ca", str(other_ca / "ca.pem"),
                              "--key", "keys/device0.key", *patience, key="device0"),
                     "not signed by the CA in --ca"),
        "plaintext": (d.client("plaintext", "device1.npz", "--insecure", *patience),
                      "the server speaks TLS: give its ca.pem with --ca"),
        "keyless": (d.start("keyless", "client", "--server", f"127.0.0.1:{d.port}",
                            "--data", "device1.npz", "--ca", "certs/ca.pem", *patience),
                    "give this device's private key with --key"),
        "nobody": (d.client("nobody", "device2.npz", *patience, key="device2",
                            server=f"127.0.0.1:{free_port()}"),
                   "nothing accepts connections at that address"),
    }
    started = time.monotonic()
    for name, (process, cause) in causes.items():
        assert process.wait(timeout=120) == 2, d.log(name)
        last = d.log(name).strip().splitlines()[-1]
        assert last.startswith("error: gave up joining the federation at"), last
        assert cause in last, last
        assert "Traceback" not in d.log(name), d.log(name)
        assert_gone_within(d, name, CHILDREN_GONE)
    # The join timeout counts from the start, loading the data included.
    assert time.monotonic() - started < JOIN_PATIENCE + 20
    assert "No SuperNode found with the given public key" in (
        d.root / "run" / "superlink.log").read_text()
    assert server.poll() is None  # the server is not disturbed by any of them


def test_a_client_whose_data_took_its_whole_join_timeout_still_tries_the_server_once(
        tmp_path):
    from fedge.client.deployment import Connection, DeviceData, run_client
    from fedge.errors import FedgeError

    digits = load_dataset("digits")
    np.savez(tmp_path / "device.npz", x=digits.x[:50], y=digits.y[:50])
    nobody = f"127.0.0.1:{free_port()}"
    # As if loading the data had taken 30 s of a 10 s join timeout: the client still
    # tries, and so learns why it cannot join.
    with pytest.raises(FedgeError, match=r"gave up joining the federation at 127\.0\.0\.1:"
                                         r"\d+ after 10 s: nothing accepts connections"):
        run_client(Connection(nobody, join_timeout=10), DeviceData(tmp_path / "device.npz"),
                   device="cpu", started=time.monotonic() - 30)


def test_a_client_killed_mid_run_is_counted_under_its_own_node_id(deployment):
    d = deployment(rounds=4, **{"min-clients": 2, "round-timeout": 30})
    server = d.server()
    for i in range(3):
        d.client(f"device{i}", f"device{i}.npz")
    # min-clients 2 lets round 1 start before the third client has joined.
    d.wait_for(lambda: any(r["num_clients"] == 3 for r in d.metrics()["rounds"]), 300,
               "a round with all three clients")
    killed = d.node_id("device0")
    d.kill("device0")
    rounds_before_kill = len(d.metrics()["rounds"])

    assert server.wait(timeout=400) == 0, d.logs()
    rounds = d.metrics()["rounds"]
    assert d.metrics()["status"] == "finished" and len(rounds) == 4
    # The round under way at the kill may or may not have heard from device0.
    assert all(r["num_clients"] == 2 for r in rounds[rounds_before_kill + 1:])
    assert sum(r["failures"] + r["timeouts"] for r in rounds) >= 1
    # The SuperLink answers for a dead node itself; the server still names, and
    # quarantines, the node it sent the message to.
    assert re.search(rf"client node {killed} (failed|did not answer)", d.log("server"))
    assert "client node 1 " not in d.log("server")


def kill_the_server_after_two_records(d: Deployment) -> None:
    """Start the server and three clients, and SIGKILL the server command alone (its
    guards end the rest) once metrics.json holds two rounds (or evaluated versions)."""
    server = d.server()
    for i in range(3):
        d.client(f"device{i}", f"device{i}.npz")
    d.wait_for(lambda: len(d.metrics()["rounds"]) >= 2, 300, "two recorded rounds")
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    assert_gone_within(d, "server", CHILDREN_GONE)


def test_a_killed_server_leaves_nothing_running_and_resumes_with_its_clients(deployment):
    d = deployment(rounds=3)  # killed once two rounds are recorded: one more to resume
    kill_the_server_after_two_records(d)
    before = d.metrics()["rounds"]

    restarted = d.server("restarted")
    assert restarted.wait(timeout=500) == 0, d.logs()
    metrics = d.metrics()
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["rounds"][: len(before)] == before
    assert "resuming after round" in d.log("restarted")
    # The clients noticed the server was gone, rejoined the new one, and left at the end.
    for i in range(3):
        assert d.processes[f"device{i}"].wait(timeout=60) == 0, d.logs()
        log = d.log(f"device{i}")
        assert "lost the server at" in log and log.count("joined the federation at") >= 2
        assert FINISHED in log and "Traceback" not in log


FEDBUFF = {"strategy": '"fedbuff"', "concurrency": 3, "buffer": 2}


def _versions(d: Deployment) -> list[dict]:
    return d.metrics().get("versions", [])


def _training(d: Deployment, name: str) -> bool:
    """``name`` has received a task it has not answered yet (its SuperNode's log)."""
    log = d.log(name)
    return log.count("Receiving: train message") > log.count("Sending: train message")


def test_a_loopback_fedbuff_deployment_completes_and_survives_a_killed_client(deployment):
    # 16 versions of about 6 s each on 2 cores: the run outlasts the killed client's 30 s
    # timeout by several of them, on a machine up to about twice as fast.
    d = deployment(rounds=16, **FEDBUFF, **{"eval-every": 1, "min-clients": 2,
                                            "round-timeout": 30, "local-epochs": 1})
    server = d.server()
    d.client("device0", "device0.npz")
    d.client("device1", "device1.npz")
    d.wait_for(lambda: len(_versions(d)) >= 1, 300, "a first version from two clients")
    # A client that joins late is given a task as soon as it is idle: a slot is free.
    versions_before_join = len(_versions(d))
    d.client("device2", "device2.npz")
    d.wait_for(lambda: "joined the federation" in d.log("device2"), 120, "device2 to join")
    late = d.node_id("device2")
    d.wait_for(lambda: _training(d, "device2"), 60, "a task for the late client")

    # device0 dies while it trains: its task gets no answer.
    d.wait_for(lambda: _training(d, "device0"), 120, "device0 to be training")
    killed = d.node_id("device0")
    d.kill("device0")
    server_log_at_kill = len(d.log("server"))
    versions_at_kill = len(_versions(d))
    # metrics.json may lag the server by the version being evaluated, and a result
    # device0 sent just before it died may still go into one of the next two versions.
    settled = versions_at_kill + 3

    assert server.wait(timeout=400) == 0, d.logs()
    metrics = d.metrics()
    versions, rounds = metrics["versions"], metrics["rounds"]
    assert metrics["status"] == "finished"
    assert metrics["asynchronous"]["strategy"] == "fedbuff"
    assert metrics["asynchronous"]["clock"] == "wall"
    assert [v["version"] for v in versions] == list(range(1, 17))
    assert [r["round"] for r in rounds] == list(range(1, 17))  # eval-every 1
    for v in versions:
        assert v["updates"] == len(v["staleness"]) == len(v["nodes"]) == 2, v
        assert all(tau >= 0 for tau in v["staleness"]), v
    assert any(tau > 0 for v in versions for tau in v["staleness"])  # no round barrier
    # The late client's updates count from the versions after it joined.
    assert min(v["version"] for v in versions if late in v["nodes"]) > versions_before_join
    survivors = {d.node_id("device1"), late}
    assert {n for v in versions for n in v["nodes"]} == survivors | {killed}
    after_kill = [v for v in versions if v["version"] > settled]
    assert after_kill, f"the run ended before version {settled}: versions too fast?"
    assert all(set(v["nodes"]) <= survivors for v in after_kill), after_kill
    # The task device0 died with is counted, under its own node id.
    assert sum(v["failures"] + v["timeouts"] for v in versions[versions_at_kill:]) >= 1
    assert sum(r["failures"] + r["timeouts"] for r in rounds[versions_at_kill:]) >= 1
    assert re.search(rf"client node {killed} (failed|did not answer)",
                     d.log("server")[server_log_at_kill:]), d.log("server")
    assert "client node 1 " not in d.log("server")
    assert "run finished: run" in d.log("server")
    for name in ("device1", "device2"):
        assert d.processes[name].wait(timeout=60) == 0, d.logs()
        assert FINISHED in d.log(name) and "Traceback" not in d.log(name)
        assert_gone_within(d, name, CHILDREN_GONE)
    assert_gone_within(d, "server", CHILDREN_GONE)
    assert "Traceback" not in d.log("server")


def test_a_killed_fedbuff_server_resumes_after_its_last_checkpointed_version(deployment):
    d = deployment(rounds=6, **FEDBUFF, **{"eval-every": 2, "local-epochs": 1})
    kill_the_server_after_two_records(d)
    before = d.metrics()
    checkpointed = before["rounds"][-1]["round"]
    assert checkpointed >= 4 and before["status"] == "running"
    # metrics.json holds every version up to the checkpointed one, and none after it.
    assert [v["version"] for v in before["versions"]] == list(range(1, checkpointed + 1))

    restarted = d.server("restarted")
    assert restarted.wait(timeout=500) == 0, d.logs()
    metrics = d.metrics()
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [2, 4, 6]
    assert metrics["rounds"][: len(before["rounds"])] == before["rounds"]
    # Versions go on after the checkpointed one: none missing, none twice, the earlier
    # ones unchanged.
    versions = metrics["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5, 6]
    assert versions[:checkpointed] == before["versions"]
    elapsed = [v["elapsed_seconds"] for v in versions]
    assert elapsed == sorted(elapsed)  # the resumed run's clock continues the first's
    # The tasks in flight at the checkpoint were lost with the server, and are counted.
    assert metrics["asynchronous"]["discarded_at_resume"] >= 1
    assert "resuming after round" in d.log("restarted")
    assert re.search(rf"resuming after version {checkpointed}: the [1-9]\d* results in "
                     "flight at its checkpoint are discarded", d.log("restarted"))
    # The clients noticed the server was gone, rejoined the new one, and left at the end.
    for i in range(3):
        assert d.processes[f"device{i}"].wait(timeout=60) == 0, d.logs()
        log = d.log(f"device{i}")
        assert "lost the server at" in log and log.count("joined the federation at") >= 2
        assert FINISHED in log and "Traceback" not in log
    assert_gone_within(d, "restarted", CHILDREN_GONE)
    assert "Traceback" not in d.log("restarted")


CLIENT_JOIN_TIMEOUT = 30  # seconds
# After the join timeout: the last retry and the SuperNode's end (README, "When the server
# stops").
LEAVING_BOUND = ENDED_GRACE + STOP_BOUND


def test_a_device_whose_labels_do_not_fit_leaves_and_too_few_clients_stop_the_server(
        deployment):
    d = deployment(rounds=3, **{"min-clients": 2, "join-timeout": 20})
    x, y = np.load(d.root / "device1.npz")["x"], np.load(d.root / "device1.npz")["y"]
    np.savez(d.root / "twelve.npz", x=x, y=np.where(y == 9, 12, y))
    server = d.server(devices=("device0", "device1"))
    left = d.client("device0", "device0.npz", "--join-timeout", str(CLIENT_JOIN_TIMEOUT))
    misfit = d.client("device1", "twelve.npz")

    assert misfit.wait(timeout=300) == 2, d.logs()
    log = d.log("device1")
    assert log.count("labels outside the federation") == 1, log  # said once
    assert "labels outside the federation's 10 classes (0..9), e.g. 12" in log
    assert "Traceback" not in log
    assert server.wait(timeout=300) == 2, d.logs()
    stopped = time.monotonic()
    last = d.log("server").strip().splitlines()[-1]
    assert last.startswith("error: only 1 of the 2 clients a round needs stayed connected "
                           "for 20 s"), last
    # Round 1 at least; a second one when the misfit's node was still registered then.
    assert re.search(r"the run folder keeps round [12]: starting the server again on", last
                     ), last
    assert "Traceback" not in d.log("server")
    first = d.metrics()["rounds"][0]
    assert (first["num_clients"], first["failures"]) == (1, 1)
    assert_gone_within(d, "server", CHILDREN_GONE)
    # The client left waiting (idle) gives up its join timeout after it lost the server,
    # and its last retry and SuperNode end within LEAVING_BOUND of that.
    assert left.wait(timeout=120) == 2, d.log("device0")
    assert time.monotonic() - stopped < CLIENT_JOIN_TIMEOUT + LEAVING_BOUND, d.log("device0")
    assert (f"has not been reachable for {CLIENT_JOIN_TIMEOUT} s since the connection was "
            "lost" in d.log("device0").strip().splitlines()[-1])


def test_the_server_reports_health_and_shuts_down_cleanly_on_sigterm(deployment):
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedge.server.checkpoint import load_checkpoint

    d = deployment(rounds=20)
    health_port = free_port()
    server = d.server("server", "--health-port", str(health_port), "--log-format", "json")

    def serving() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    d.wait_for(serving, 60, "the health endpoint")
    clients = [d.client(f"device{i}", f"device{i}.npz", "--join-timeout", "15")
               for i in range(3)]
    # fedge's log lines are JSON objects a log collector can parse, also those the
    # ServerApp's process logs (Flower streams them to `fedge server`'s output).
    def logged_round_1() -> bool:
        return any(line["logger"] == "fedge.server" and line["message"].startswith("round 1:")
                   for line in map(json.loads, _json_lines(d.log("server"))))

    d.wait_for(logged_round_1, 300, "round 1 in the server's log")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 130
    assert_gone_within(d, "server", CHILDREN_GONE)

    checkpoint = load_checkpoint(d.root / "run" / "checkpoint.pt")
    assert checkpoint.round == len(d.metrics()["rounds"]) >= 1
    assert d.metrics()["status"] == "running"
    with socket.socket() as sock:  # the SuperLink is gone and its port is free again
        # As a restarted server binds it: a connection the SuperLink closed stays in
        # FIN-WAIT-2 on its port while the client that held it still runs.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", d.port))
        sock.listen()
    # A server that stops without finishing its run says nothing to its clients: they
    # try to rejoin for their join timeout, then give up and say so.
    for i, client in enumerate(clients):
        assert client.wait(timeout=60) == 2, d.log(f"device{i}")
        last = d.log(f"device{i}").strip().splitlines()[-1]
        assert last.startswith("error: gave up: the server at 127.0.0.1:"), last
        assert "has not been reachable for 15 s since the connection was lost" in last
        assert_gone_within(d, f"device{i}", CHILDREN_GONE)


# A ClientApp that is not fedge's, as a Flower tutorial writes one: it answers train
# messages (here with the weights it was sent) and knows no other message.
STOCK_CLIENTAPP = """
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    reply = RecordDict({"arrays": msg.content["arrays"],
                        "metrics": MetricRecord({"num-examples": 1})})
    return Message(reply, reply_to=msg)
"""


def start_flower_supernode(d: Deployment, name: str, home: Path, **env: str) -> None:
    """Flower's own ``flower-supernode`` joining ``d``'s insecure server as ``name``."""
    bin_dir = str(Path(sys.executable).parent)  # Flower starts its helpers by name
    with open(d.root / f"{name}.log", "ab") as log:
        d.processes[name] = subprocess.Popen(
            [str(Path(bin_dir) / "flower-supernode"), "--insecure",
             "--superlink", f"127.0.0.1:{d.port}", "--port", str(free_port()),
             "--max-wait-time", "60"],
            cwd=d.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ["PATH"]]),
                 "FLWR_HOME": str(home), MARKER: f"{d.marker}-{name}", **env})


def test_nodes_that_do_not_run_fedge_client_are_named_and_never_sent_what_they_cannot_answer(
        deployment, tmp_path, monkeypatch):
    # fedge finds Flower's commands with its own Python, also when its environment's bin
    # is not on PATH (the environment not activated).
    monkeypatch.setenv("PATH", path_without_this_python())
    d = deployment(rounds=1, **{"min-clients": 3, "join-timeout": 60})
    server = d.start("server", "server", "--val-data", "val.npz", "--config", "run.toml",
                     "--insecure", "--host", "127.0.0.1", "--port", str(d.port), "-o", "run")
    d.wait_for(lambda: "SuperLink listening" in d.log("server"), 60, "the SuperLink")
    client = d.client("device0", "device0.npz", "--insecure")
    # Someone joins with Flower's own SuperNode instead of `fedge client`.
    start_flower_supernode(d, "plain", tmp_path / "plain-home")
    # A device whose environment answers with a stock ClientApp under the name of fedge's.
    stock = tmp_path / "stock"
    (stock / "fedge" / "client").mkdir(parents=True)
    (stock / "fedge" / "__init__.py").write_text("")
    (stock / "fedge" / "client" / "__init__.py").write_text("")
    (stock / "fedge" / "client" / "relay.py").write_text(STOCK_CLIENTAPP)
    start_flower_supernode(d, "stock", tmp_path / "stock-home", PYTHONPATH=str(stock))

    # The plain node's round fails, with the reason under its node id; the run still
    # finishes with the other two.
    assert server.wait(timeout=300) == 0, d.logs()
    (node,) = re.findall(r"SuperNode ID: (\d+)", d.log("plain"))
    assert f"client node {node} failed: {NOT_FEDGE_CLIENT}" in d.log("server")
    (first,) = d.metrics()["rounds"]
    assert (first["num_clients"], first["failures"]) == (2, 1)
    # The fedge client is told that the run is over: it leaves, status 0.
    assert client.wait(timeout=60) == 0, d.logs()
    assert FINISHED in d.log("device0")
    # The plain node's own log says what the federation expects, and then that the run
    # is over (fedge's ClientApp answers that, trainer or not).
    d.wait_for(lambda: "fedge: the federation's run finished" in d.log("plain"), 30,
               "the farewell in the plain SuperNode's log")
    plain = d.log("plain")
    assert f"fedge: {NOT_FEDGE_CLIENT}" in plain
    assert "`fedge client --server HOST:PORT --data FILE`" in plain
    # The stock ClientApp answered its round, so the server knows it for another
    # ClientApp and sends it nothing else.
    assert "Sending: train message" in d.log("stock")
    assert "not told: 1 nodes that run another ClientApp" in d.log("server")
    assert "No query function registered" not in d.log("stock")
    for name in ("server", "device0", "plain", "stock"):
        assert "Traceback" not in d.log(name) and "KeyError" not in d.log(name), d.log(name)


def test_a_regression_task_trains_across_machines(deployment):
    """Clients read their float targets with --task regression; the server reports the
    task's measures and every client's own, under its node id."""
    d = deployment(rounds=1, model='"mlp"', task='"regression"', **{"local-epochs": 1})
    data = load_diabetes()
    x, y = data.data.astype(np.float32), data.target.astype(np.float32)
    np.savez(d.root / "val.npz", x=x[:60], y=y[:60])
    np.savez(d.root / "test.npz", x=x[60:120], y=y[60:120])
    for i, rows in enumerate(np.array_split(np.arange(120, len(y)), 3)):
        np.savez(d.root / f"device{i}.npz", x=x[rows], y=y[rows])
    server = d.server()
    clients = [d.client(f"device{i}", f"device{i}.npz", "--task", "regression")
               for i in range(3)]
    assert server.wait(timeout=300) == 0, d.logs()
    metrics = d.metrics()
    assert metrics["status"] == "finished" and metrics["test"]["rmse"] < y.std() * 1.5
    node_ids = {str(d.node_id(f"device{i}")) for i in range(3)}
    assert set(metrics["rounds"][-1]["clients"]) == node_ids
    for client in clients:
        assert client.wait(timeout=60) == 0, d.logs()
