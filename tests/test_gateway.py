"""The edge gateway's device side: real HTTPS on 127.0.0.1 with fedge's certificates, and
a small device (:class:`Device`, the protocol's reference client) that speaks
``client/device/PROTOCOL.md``. ``run_round`` runs in a thread, as the Flower adapter
calls it."""

import hashlib
import http.client
import importlib.util
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import FedgeError
from fedge.models.blob import pack, unpack
from fedge.server.certs import make_certificates
from fedge.server.device_tokens import make_tokens, read_token_digests
from fedge.server.gateway import DeviceFleet, GatewaySettings

pytestmark = pytest.mark.edge

NAMES = ["dev1", "dev2", "dev3", "dev4"]
PROGRAMS = {hashlib.sha256(data).hexdigest(): data
            for data in (b"train program bytes", b"predict program bytes")}
TRAIN_SHA, PREDICT_SHA = PROGRAMS
STATE = [("fc.weight", [2, 3], True, False), ("fc.bias", [2], True, False),
         ("bn.running_mean", [2], False, False), ("emb.weight", [4, 2], True, True)]
MANIFEST = {
    "format": 1, "model": "tiny", "input": {"shape": [3], "dtype": "float32"},
    "num_classes": 2, "class_names": None, "max_batch": 8,
    "state": [{"name": name, "shape": shape, "parameter": parameter, "frozen": frozen}
              for name, shape, parameter, frozen in STATE],
    "programs": {"train": {"sha256": TRAIN_SHA, "bytes": len(PROGRAMS[TRAIN_SHA])},
                 "predict": {"sha256": PREDICT_SHA, "bytes": len(PROGRAMS[PREDICT_SHA])}},
}
TRAINED = ["fc.weight", "fc.bias", "bn.running_mean"]  # the entries that are not frozen
TRAINING = {"epochs": 2, "batch_size": 4, "lr": 0.01, "optimizer": "adam", "patience": 1,
            "proximal_mu": 0.0, "seed": 1234}
GLOBAL = {name: np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 4
          for name, shape, _, _ in STATE}


class Device:
    """One device speaking the protocol: a bearer token, TLS verified against the CA."""

    def __init__(self, name: str, token: str, port: int, ca: Path | None) -> None:
        self.name, self.token, self.port = name, token, port
        self.context = ssl.create_default_context(cafile=ca) if ca else None

    def connect(self) -> http.client.HTTPConnection:
        if self.context is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30,
                                           context=self.context)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes, str | None]:
        connection = self.connect()
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            if body is not None:
                headers["Content-Type"] = content_type
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("Content-Type")
        finally:
            connection.close()

    def call(self, method: str, path: str, payload: object = None) -> tuple[int, dict | None]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data, content_type = self.request(method, path, body)
        if not data:
            return status, None
        assert content_type == "application/json"
        return status, json.loads(data)

    def hello(self, samples: int) -> tuple[int, dict | None]:
        return self.call("POST", "/v1/hello", {"samples": samples,
                                               "runtime": "executorch 1.5.1",
                                               "client": "test-device 0.1"})

    def poll(self, wait: float = 10.0) -> tuple[int, dict | None]:
        return self.call("GET", f"/v1/task?wait={wait}")

    def take_task(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The next task, its programs (checked by hash) and its weights."""
        status, task = self.poll()
        assert status == 200, (status, task)
        for program in task["manifest"]["programs"].values():
            status, data, _ = self.request("GET", f"/v1/programs/{program['sha256']}")
            assert status == 200
            assert hashlib.sha256(data).hexdigest() == program["sha256"]
        status, data, content_type = self.request("GET", f"/v1/tasks/{task['task']}/weights")
        assert (status, content_type) == (200, "application/octet-stream")
        return task, unpack(data)[1]

    def post_result(self, task: dict, blob: bytes) -> tuple[int, dict]:
        status, data, _ = self.request("POST", f"/v1/tasks/{task['task']}/result", blob,
                                       "application/octet-stream")
        return status, json.loads(data)

    def post_failure(self, task: dict, error: str) -> tuple[int, dict | None]:
        return self.call("POST", f"/v1/tasks/{task['task']}/failure", {"error": error})


def result_blob(arrays: dict[str, np.ndarray], num_examples: object,
                metrics: dict | None = None, program: str = TRAIN_SHA) -> bytes:
    return pack({"program": program, "num_examples": num_examples,
                 "metrics": metrics or {}}, arrays)


def trained(weights: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
    """What a device returns: its trained entries, moved by ``step`` (exact in float32)."""
    return {name: weights[name] + np.float32(step) for name in TRAINED}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, ["127.0.0.1"])
    return folder


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    make_tokens(NAMES, folder)
    return folder


@contextmanager
def gateway(certs: Path | None, tokens: Path, **settings: object
            ) -> Iterator[tuple[DeviceFleet, Callable[[str], Device], ThreadPoolExecutor]]:
    """A fleet serving on a free port, a maker of its devices, and threads to run them."""
    fleet = DeviceFleet(read_token_digests(tokens), GatewaySettings(**settings))
    cert, key, ca = ((certs / "server.pem", certs / "server.key", certs / "ca.pem")
                     if certs else (None, None, None))
    with fleet.serving("127.0.0.1", 0, cert, key) as port, ThreadPoolExecutor(8) as pool:
        yield fleet, lambda name: Device(name, (tokens / f"{name}.token").read_text(),
                                         port, ca), pool


def scrape_gateway_metrics(fleet: DeviceFleet) -> dict[str, float] | None:
    """``fleet``'s metrics served over HTTP as ``fedge gateway --metrics-port`` serves
    them, scraped once and parsed by prometheus_client (None without it)."""
    if importlib.util.find_spec("prometheus_client") is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    from fedge.server.operator_metrics import GatewayMetrics, serving_metrics

    with serving_metrics("127.0.0.1", 0, GatewayMetrics(fleet)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def start_round(fleet: DeviceFleet, pool: ThreadPoolExecutor, number: int = 1):
    return pool.submit(fleet.run_round, number, MANIFEST, PROGRAMS, GLOBAL, TRAINING)


def test_a_round_averages_three_devices_by_their_examples(certs, tokens, caplog):
    caplog.set_level(logging.INFO, logger="fedge.gateway")
    samples = {"dev1": 100, "dev2": 300, "dev3": 50}
    rng = np.random.default_rng(0)
    sent = {name: {key: (rng.integers(-40, 40, np.shape(GLOBAL[key])) / 8).astype(np.float32)
                   for key in TRAINED} for name in samples}
    metrics = {"dev1": {"val_loss": 0.5, "train_seconds": 2.0, "epochs": 2},
               "dev2": {"val_loss": 0.25, "train_seconds": 4.5, "epochs": 1},
               "dev3": {"val_loss": 1.0, "train_seconds": 1.0,
                        "epochs": 10**400}}  # too large for a float: left out

    def device_round(device: Device) -> tuple[dict, dict, tuple, tuple]:
        task, weights = device.take_task()
        answer = device.post_result(task, result_blob(sent[device.name], samples[device.name],
                                                      metrics[device.name]))
        return task, weights, answer, device.poll(wait=0)

    with gateway(certs, tokens, poll_seconds=10) as (fleet, device, pool):
        devices = [device(name) for name in samples]
        for one in devices:
            assert one.hello(samples[one.name]) == (200, {"device": one.name,
                                                          "poll_seconds": 10})
        rounds = [pool.submit(device_round, one) for one in devices]
        result = start_round(fleet, pool).result(timeout=30)
        replies = [future.result(timeout=30) for future in rounds]
        scraped = scrape_gateway_metrics(fleet)

    n = np.array([samples[name] for name in samples], dtype=np.float64)
    for key in TRAINED:
        stacked = np.stack([sent[name][key] for name in samples]).astype(np.float64)
        expected = np.average(stacked, axis=0, weights=n).astype(np.float32)
        assert result.arrays[key].dtype == np.float32
        np.testing.assert_array_equal(result.arrays[key], expected)
    assert list(result.arrays) == TRAINED  # the frozen entry does not travel back
    assert result.num_examples == 450
    assert result.metrics["val_loss"] == pytest.approx((0.5 * 100 + 0.25 * 300 + 50) / 450)
    assert result.metrics["epochs"] == pytest.approx((2 * 100 + 300) / 400)
    assert result.metrics["train_seconds"] == 4.5
    assert result.metrics["devices"] == 3
    assert result.report == {"dev1": "accepted", "dev2": "accepted", "dev3": "accepted"}

    tasks = [task for task, _, _, _ in replies]
    assert len({task["task"] for task in tasks}) == 1 and tasks[0]["round"] == 1
    assert tasks[0]["manifest"] == MANIFEST
    seeds = {task["training"].pop("seed") for task in tasks}
    assert len(seeds) == 3 and TRAINING["seed"] not in seeds  # each device shuffles its way
    assert all(task["training"] == {k: v for k, v in TRAINING.items() if k != "seed"}
               for task in tasks)
    assert all(0 < task["deadline_seconds"] <= 60 for task in tasks)
    for _, weights, answer, again in replies:
        assert weights.keys() == GLOBAL.keys()  # every state entry, frozen ones too
        assert all(np.array_equal(weights[key], GLOBAL[key]) for key in GLOBAL)
        assert answer == (200, {"accepted": True})
        assert again == (204, None)  # a device that answered does not get the task again
    assert "device dev2 said hello: 300 samples (executorch 1.5.1, test-device 0.1)" in (
        caplog.messages)
    assert "round 1: 3 of 3 devices returned results (100 + 300 + 50 examples)" in (
        caplog.messages)
    if scraped is not None:  # the operator's metrics, as Prometheus reads them
        assert scraped["fedge_gateway_devices_known"] == 4
        assert scraped["fedge_gateway_devices_seen"] == 3
        assert scraped["fedge_gateway_round"] == 1
        assert scraped['fedge_gateway_rounds_total{outcome="completed"}'] == 1
        assert scraped['fedge_gateway_rounds_total{outcome="failed"}'] == 0
        assert scraped['fedge_gateway_device_results_total{outcome="accepted"}'] == 3
        assert scraped['fedge_gateway_device_results_total{outcome="rejected"}'] == 0
        bodies = sum(len(result_blob(sent[name], samples[name], metrics[name]))
                     for name in samples)
        assert scraped["fedge_gateway_received_bytes_total"] == bodies


def test_nan_and_misshaped_results_are_rejected_while_the_round_completes(certs, tokens,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="fedge.gateway")

    def answer(device: Device) -> tuple[int, dict]:
        task, weights = device.take_task()
        arrays = trained(weights, 1.0)
        if device.name == "dev2":
            arrays["fc.weight"][0, 1] = np.nan
        if device.name == "dev3":
            arrays["fc.bias"] = np.zeros(3, dtype=np.float32)
        return device.post_result(task, result_blob(arrays, 10))

    with gateway(certs, tokens, round_deadline=60) as (fleet, device, pool):
        devices = [device(name) for name in ("dev1", "dev2", "dev3")]
        for one in devices:
            assert one.hello(10)[0] == 200
        answers = [pool.submit(answer, one) for one in devices]
        result = start_round(fleet, pool).result(timeout=30)  # long before the deadline
        dev1, dev2, dev3 = (future.result(timeout=30) for future in answers)

    assert dev1 == (200, {"accepted": True})
    assert dev2 == (422, {"error": "array 'fc.weight' holds NaN"})
    assert dev3[0] == 422 and "'fc.bias'" in dev3[1]["error"] and "[3]" in dev3[1]["error"]
    assert result.report == {"dev1": "accepted",
                             "dev2": "rejected: array 'fc.weight' holds NaN",
                             "dev3": f"rejected: {dev3[1]['error']}"}
    for key in TRAINED:
        np.testing.assert_array_equal(result.arrays[key], GLOBAL[key] + np.float32(1.0))
    assert result.num_examples == 10 and result.metrics == {"devices": 1}
    line = next(message for message in caplog.messages if message.startswith("round 1:"))
    assert line.startswith("round 1: 1 of 3 devices returned results (10 examples); ")
    assert "dev2 rejected: array 'fc.weight' holds NaN" in line


def test_refused_results_wrong_program_malformed_or_too_large(certs, tokens):
    def answer(device: Device) -> tuple[int, dict]:
        task, weights = device.take_task()
        if device.name == "dev1":
            return device.post_result(task, result_blob(trained(weights, 1), 5,
                                                        program=PREDICT_SHA))
        if device.name == "dev2":
            return device.post_result(task, b"\x05\x00\x00\x00{oops")
        if device.name == "dev3":  # the size alone is refused: nothing more is sent
            connection = device.connect()
            try:
                connection.putrequest("POST", f"/v1/tasks/{task['task']}/result")
                connection.putheader("Authorization", f"Bearer {device.token}")
                connection.putheader("Content-Type", "application/octet-stream")
                connection.putheader("Content-Length", str(64 * 2**20 + 1))
                connection.endheaders()
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()
        return device.post_result(task, result_blob(trained(weights, 2), 7))

    with gateway(certs, tokens) as (fleet, device, pool):
        devices = [device(name) for name in NAMES]
        for one in devices:
            assert one.hello(10)[0] == 200
        answers = [pool.submit(answer, one) for one in devices]
        result = start_round(fleet, pool).result(timeout=30)
        dev1, dev2, dev3, dev4 = (future.result(timeout=30) for future in answers)

    assert dev1[0] == 400 and dev1[1]["error"].startswith("program hash mismatch")
    assert PREDICT_SHA in dev1[1]["error"] and TRAIN_SHA in dev1[1]["error"]
    assert dev2[0] == 400 and dev2[1]["error"].startswith("malformed result")
    assert dev3[0] == 413 and "limit" in dev3[1]["error"]
    assert dev4 == (200, {"accepted": True})
    assert result.report == {"dev1": f"rejected: {dev1[1]['error']}",
                             "dev2": f"rejected: {dev2[1]['error']}",
                             "dev3": f"rejected: {dev3[1]['error']}", "dev4": "accepted"}
    assert result.num_examples == 7


def crafted_result(arrays: list[dict] | bytes) -> bytes:
    """A result blob whose header lists ``arrays`` (or is those raw JSON bytes), with no
    array bytes after it."""
    text = arrays if isinstance(arrays, bytes) else json.dumps(
        {"program": TRAIN_SHA, "num_examples": 3, "metrics": {}, "arrays": arrays}).encode()
    return len(text).to_bytes(4, "little") + text


NESTED = b"[" * 100_000 + b"]" * 100_000  # deeper than any JSON parser's recursion


def test_crafted_bodies_are_refused_with_the_reason_and_the_round_goes_on(certs, tokens,
                                                                          caplog, capsys):
    caplog.set_level(logging.INFO, logger="fedge.gateway")
    crafted = {  # each device's body, and what the gateway answers
        "dev1": (crafted_result(NESTED), "malformed result: the result's header nests JSON "
                                         "too deeply"),
        # 2^62 · 4 · 4 bytes wraps to 0 in int64 arithmetic; 10^30 fits no int64.
        "dev2": (crafted_result([{"name": "fc.bias", "shape": [2**62, 4], "dtype":
                                  "float32"}]), "array 'fc.bias' needs 73786976294838206464"),
        "dev3": (crafted_result([{"name": "fc.bias", "shape": [10**30], "dtype": "float32"}]),
                 f"array 'fc.bias' has shape [{10**30}], not a list of at most 32 sizes"),
    }

    def answer(device: Device) -> tuple[int, dict]:
        task, _ = device.take_task()
        if device.name == "dev4":  # a failure report nested too deeply
            status, data, _ = device.request("POST", f"/v1/tasks/{task['task']}/failure",
                                             NESTED)
            return status, json.loads(data)
        return device.post_result(task, crafted[device.name][0])

    with gateway(certs, tokens, round_deadline=60) as (fleet, device, pool):
        devices = [device(name) for name in NAMES]
        for one in devices:
            assert one.hello(3)[0] == 200
        answers = {one.name: pool.submit(answer, one) for one in devices}
        with pytest.raises(FedgeError, match="round 1 failed: 0 of 4 devices"):
            start_round(fleet, pool).result(timeout=30)  # long before the deadline
        got = {name: future.result(timeout=30) for name, future in answers.items()}

    for name, (_, reason) in crafted.items():
        assert got[name][0] == 400 and reason in got[name][1]["error"], got[name]
    assert got["dev4"] == (400, {"error": "the body nests JSON too deeply"})
    (line,) = [message for message in caplog.messages if message.startswith("round 1:")]
    for name, (_, body) in got.items():
        assert f"{name} rejected: {body['error']}" in line
    assert "Traceback" not in capsys.readouterr().err


def test_crafted_requests_get_an_answer_with_the_reason(certs, tokens, capsys):
    def raw(device: Device, method: str, path: str, headers: dict[str, str],
            body: bytes = b"") -> tuple[int, dict]:
        connection = device.connect()
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for header, value in {"Authorization": f"Bearer {device.token}", **headers}.items():
                connection.putheader(header, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    with gateway(certs, tokens) as (_, device, _):
        dev1 = device("dev1")
        status, body = raw(dev1, "POST", "/v1/hello", {"Content-Length": str(len(NESTED))},
                           NESTED)
        assert (status, body) == (400, {"error": "the body nests JSON too deeply"})
        status, body = raw(dev1, "GET", "http://[::1/v1/task", {})
        assert status == 400 and "is not a URL" in body["error"]
        # int() reads "²" as 2 and fails on it
        status, body = raw(dev1, "POST", "/v1/task", {"Content-Length": "\u00b2"})
        assert (status, body) == (405, {"error": "use GET for this path"})
        status, body = raw(dev1, "POST", "/v1/hello", {"Content-Length": "\u00b2"}, b"{}")
        assert status == 400 and "is not a size" in body["error"]
        assert dev1.hello(3)[0] == 200  # the gateway serves on
    assert "Traceback" not in capsys.readouterr().err


def test_a_silent_device_holds_the_round_until_its_deadline_then_is_too_late(certs, tokens):
    with gateway(certs, tokens, round_deadline=2.0) as (fleet, device, pool):
        dev1, dev2 = device("dev1"), device("dev2")
        assert dev1.hello(3)[0] == dev2.hello(3)[0] == 200
        took = pool.submit(dev2.take_task)  # dev2 takes the task and says nothing
        task = pool.submit(dev1.take_task)
        started = time.monotonic()
        running = start_round(fleet, pool)
        task1, weights1 = task.result(timeout=30)
        assert dev1.post_result(task1, result_blob(trained(weights1, 0.5), 3)) == (
            200, {"accepted": True})
        task2, weights2 = took.result(timeout=30)
        result = running.result(timeout=30)
        waited = time.monotonic() - started
        late = dev2.post_result(task2, result_blob(trained(weights2, 0.5), 3))

    assert waited >= 2.0
    assert result.report == {"dev1": "accepted", "dev2": "no result"}
    assert result.num_examples == 3
    assert late[0] == 409 and "round 1 is over" in late[1]["error"]


def test_too_few_results_fail_the_round_naming_each_device(certs, tokens):
    def answer(device: Device) -> tuple[int, dict | None]:
        task, weights = device.take_task()
        if device.name == "dev2":
            return device.post_failure(task, "out of memory")
        arrays = trained(weights, 1)
        if device.name == "dev3":
            arrays["fc.weight"][:] = np.nan
        return device.post_result(task, result_blob(arrays, 4))

    with gateway(certs, tokens, min_devices=2) as (fleet, device, pool):
        devices = [device(name) for name in ("dev1", "dev2", "dev3")]
        for one in devices:
            assert one.hello(4)[0] == 200
        answers = [pool.submit(answer, one) for one in devices]
        with pytest.raises(FedgeError) as failure:
            start_round(fleet, pool).result(timeout=30)
        assert [future.result(timeout=30)[0] for future in answers] == [200, 200, 422]

    message = str(failure.value)
    assert message.startswith("round 1 failed: 1 of 3 devices returned results (4 examples)")
    assert "dev1 accepted" in message
    assert "dev2 failed: out of memory" in message
    assert "dev3 rejected: array 'fc.weight' holds NaN" in message
    assert "fewer than the 2 it needs (min_devices)" in message


def test_unknown_tokens_get_401_and_unknown_things_404(certs, tokens):
    before = set(threading.enumerate())
    with gateway(certs, tokens) as (_, device, _):
        stranger = device("dev1")
        stranger.token = "not-a-token"
        status, body = stranger.poll(wait=0)
        assert status == 401 and "token" in body["error"]
        status, body = stranger.call("POST", "/v1/tasks/r1-abc/result", {"x": 1})
        assert status == 401 and "token" in body["error"]
        stranger.token = ""
        assert stranger.call("GET", "/v1/task")[0] == 401

        dev1 = device("dev1")
        assert dev1.poll(wait=0) == (204, None)  # no round yet
        assert dev1.call("GET", "/v1/nothing-here")[0] == 404
        assert dev1.call("GET", f"/v1/programs/{TRAIN_SHA}")[0] == 404  # no round published
        assert dev1.call("GET", "/v1/tasks/r1-abc/weights")[0] == 404
        status, body = dev1.call("POST", "/v1/hello", {"runtime": "x"})
        assert status == 400 and "samples" in body["error"]
        # A device that connects and says nothing does not keep the gateway from closing.
        idle = socket.create_connection(("127.0.0.1", dev1.port))
    idle.close()
    assert set(threading.enumerate()) <= before


def test_finish_answers_410_with_the_summary_over_plaintext(tokens):
    with gateway(None, tokens, poll_seconds=10) as (fleet, device, pool):
        dev1 = device("dev1")
        assert dev1.hello(3) == (200, {"device": "dev1", "poll_seconds": 10})
        waiting = pool.submit(dev1.poll, 10)
        fleet.finish("5 rounds; accuracy 0.93")
        assert waiting.result(timeout=30) == (410, {"finished": "5 rounds; accuracy 0.93"})
        assert device("dev2").poll(wait=0) == (410, {"finished": "5 rounds; accuracy 0.93"})
        with pytest.raises(FedgeError, match="finished"):
            start_round(fleet, pool).result(timeout=30)


def test_tokens_are_made_once_and_their_digests_read(tmp_path):
    folder = tmp_path / "tokens"
    paths = make_tokens(["edge-1", "phone_2.a"], folder)
    assert paths == [folder / "edge-1.token", folder / "edge-1.sha256",
                     folder / "phone_2.a.token", folder / "phone_2.a.sha256"]
    token = (folder / "edge-1.token").read_text()
    assert len(token) >= 43 and token.strip() == token
    assert stat.S_IMODE(os.stat(folder / "edge-1.token").st_mode) == 0o600
    digests = read_token_digests(folder)
    assert digests.keys() == {"edge-1", "phone_2.a"}
    assert digests["edge-1"] == hashlib.sha256(token.encode()).hexdigest()
    assert digests["edge-1"] != digests["phone_2.a"]

    with pytest.raises(FedgeError, match="refusing to overwrite"):
        make_tokens(["new", "edge-1"], folder)
    assert (folder / "edge-1.token").read_text() == token
    assert not (folder / "new.token").exists()
    for bad in ("a/b", "", "dev 1", "../x"):
        with pytest.raises(FedgeError, match="not a device name"):
            make_tokens(["fine", bad], tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(FedgeError, match="more than once"):
        make_tokens(["x", "x"], tmp_path / "other")

    with pytest.raises(FedgeError, match="does not exist"):
        read_token_digests(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedgeError, match=r"no NAME\.sha256"):
        read_token_digests(tmp_path / "empty")
    (folder / "broken.sha256").write_text("not a digest\n")
    with pytest.raises(FedgeError, match=r"broken\.sha256"):
        read_token_digests(folder)

