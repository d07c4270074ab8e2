"""Operator metrics: the live state the ServerApp keeps, what a scrape of `fedge server` or
a gateway shows of it in Prometheus' text format (parsed with prometheus_client's own
parser), and the checks of --metrics-port before anything starts."""

import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.files import write_json
from fedge.server.observers import PHASES, RunStart
from fedge.server.operator_metrics import (
    LIVE_FILE,
    GatewayMetrics,
    LiveState,
    ServerMetrics,
    check_metrics_port,
    new_state,
    serving_metrics,
)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def exposition(*collectors: object) -> str:
    registry = prometheus_client.CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return prometheus_client.generate_latest(registry).decode()


def samples(text: str) -> dict[tuple, float]:
    """Every sample, by its name and sorted labels."""
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return reply.read().decode()


def families(text: str) -> dict[str, str]:
    """Each metric family's name and type."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def record(number: int, **changes: object) -> dict:
    """A round as metrics.json keeps it (the fields the metrics read)."""
    return {"round": number, "val_loss": 1.0 / number, "num_clients": 3, "failures": 0,
            "timeouts": 0, "rejected": 0, "bytes_per_client": 1000.0, "seconds": 4.5,
            "epsilon": None, "val_measures": {"accuracy": 0.5 + number / 10,
                                              "per_class": {"0": 0.9}}, **changes}


def run_start(run_dir: Path, strategy: str = "fedavg", resumed_after: int = 0) -> RunStart:
    return RunStart(run_dir=run_dir, config=RunConfig().updated(strategy=strategy),
                    fingerprint="abc", origin=None,
                    unit="version" if strategy == "fedbuff" else "round",
                    headline="accuracy", resumed_after=resumed_after, command="server")


def server_metrics(run_dir: Path, strategy: str = "fedavg", up: bool = True) -> ServerMetrics:
    return ServerMetrics(run_dir, strategy, "classification", "accuracy", lambda: up)


def test_a_hand_written_live_file_is_served_with_prometheus_names_and_types(tmp_path):
    state = {**new_state(), "phase": "training", "round": 7, "rounds_completed": 7,
             "clients_connected": 3, "clients_sampled": 3, "client_failures": 2,
             "client_timeouts": 1, "updates_rejected": 4, "received_bytes": 123456,
             "validation_loss": 0.25, "validation_measures": {"accuracy": 0.91,
                                                             "macro_f1": 0.9,
                                                             "threshold": 0.5},
             "round_seconds": 4.5, "epsilon": 1.5,
             "run": {"run_dir": str(tmp_path), "strategy": "fedavg",
                     "task": "classification", "headline": "accuracy", "unit": "round"}}
    (tmp_path / LIVE_FILE).parent.mkdir()
    write_json(tmp_path / LIVE_FILE, state)
    text = exposition(server_metrics(tmp_path))
    found = samples(text)

    assert found[("fedge_rounds_completed_total",)] == 7
    assert found[("fedge_round",)] == 7
    assert found[("fedge_clients_connected",)] == 3
    assert found[("fedge_clients_sampled",)] == 3
    assert found[("fedge_client_failures_total",)] == 2
    assert found[("fedge_client_timeouts_total",)] == 1
    assert found[("fedge_updates_rejected_total",)] == 4
    assert found[("fedge_received_bytes_total",)] == 123456
    assert found[("fedge_validation_loss",)] == 0.25
    assert found[("fedge_validation_measure", ("measure", "accuracy"))] == 0.91
    assert ("fedge_validation_measure", ("measure", "threshold")) not in found  # no measure
    assert found[("fedge_round_duration_seconds",)] == 4.5
    assert found[("fedge_privacy_epsilon",)] == 1.5
    assert found[("fedge_superlink_up",)] == 1
    assert {phase: found[("fedge_phase", ("phase", phase))] for phase in PHASES} == {
        phase: float(phase == "training") for phase in PHASES}
    assert found[("fedge_run_info", ("headline", "accuracy"), ("run_dir", str(tmp_path)),
                  ("strategy", "fedavg"), ("task", "classification"), ("unit", "round"))] == 1
    types = families(text)
    assert types["fedge_rounds_completed"] == types["fedge_received_bytes"] == "counter"
    assert types["fedge_validation_loss"] == types["fedge_phase"] == "gauge"
    assert all(name.startswith("fedge_") for name in types)
    assert "fedge_fedbuff_staleness" not in types  # FedAvg has no staleness


def test_before_the_serverapp_writes_anything_the_server_says_starting_and_superlink_down(
        tmp_path):
    found = samples(exposition(server_metrics(tmp_path, up=False)))
    assert found[("fedge_phase", ("phase", "starting"))] == 1
    assert found[("fedge_superlink_up",)] == 0
    assert found[("fedge_rounds_completed_total",)] == 0
    assert ("fedge_validation_loss",) not in found  # nothing measured yet: no sample


def test_the_live_state_follows_a_fedbuff_run_and_its_staleness_histogram(tmp_path):
    live = LiveState(tmp_path / LIVE_FILE)
    live.phase("starting")
    live.connected(2)
    live.phase("waiting")
    live.started(run_start(tmp_path, "fedbuff"))
    live.initial({"val_loss": 2.3, "val_measures": {"accuracy": 0.1}})
    metrics = server_metrics(tmp_path, "fedbuff")
    found = samples(exposition(metrics))
    assert found[("fedge_phase", ("phase", "waiting"))] == 1
    assert found[("fedge_validation_loss",)] == 2.3  # round 0: the starting model
    assert found[("fedge_clients_connected",)] == 2

    live.connected(3)
    live.phase("training")
    live.round_done(record(2, rejected=1, failures=1, timeouts=2, epsilon=0.7), True,
                    [0, 1, 1, 3])
    live.round_done(record(4, bytes_per_client=None), False, [40])
    live.ended("finished")
    text = exposition(metrics)
    found = samples(text)
    assert found[("fedge_phase", ("phase", "finished"))] == 1
    assert found[("fedge_rounds_completed_total",)] == 2
    assert found[("fedge_round",)] == 4  # FedBuff's version
    assert found[("fedge_clients_sampled",)] == 3
    assert found[("fedge_client_failures_total",)] == 1
    assert found[("fedge_client_timeouts_total",)] == 2
    assert found[("fedge_updates_rejected_total",)] == 1
    assert found[("fedge_received_bytes_total",)] == 4000  # 3 aggregated + 1 rejected
    assert found[("fedge_validation_loss",)] == 0.25
    assert found[("fedge_validation_measure", ("measure", "accuracy"))] == pytest.approx(0.9)
    assert ("fedge_validation_measure", ("measure", "per_class")) not in found
    assert ("fedge_privacy_epsilon",) not in found  # the last round spent none
    assert families(text)["fedge_fedbuff_staleness"] == "histogram"
    buckets = {dict(labels)["le"]: value for name, *labels in found
               if name == "fedge_fedbuff_staleness_bucket"
               for value in [found[(name, *labels)]]}
    assert buckets == {"0.0": 1, "1.0": 3, "2.0": 3, "4.0": 4, "8.0": 4, "16.0": 4,
                       "32.0": 4, "+Inf": 5}
    assert found[("fedge_fedbuff_staleness_count",)] == 5
    assert found[("fedge_fedbuff_staleness_sum",)] == 45
    assert json.loads((tmp_path / LIVE_FILE).read_text())["status"] == "finished"


def test_a_resumed_run_counts_on_from_its_history_and_counters_never_go_down(tmp_path):
    rounds = [record(1, failures=1), record(2, timeouts=1), record(3)]  # 3: after the kill
    write_json(tmp_path / "metrics.json", {"status": "running", "rounds": rounds})
    metrics = server_metrics(tmp_path)
    # Before the restarted ServerApp writes, the scrape shows the run folder's history.
    assert samples(exposition(metrics))[("fedge_rounds_completed_total",)] == 3

    live = LiveState(tmp_path / LIVE_FILE)
    live.phase("starting")
    live.started(run_start(tmp_path, resumed_after=2))  # the checkpoint's round
    found = samples(exposition(metrics))
    assert found[("fedge_client_failures_total",)] == 1
    assert found[("fedge_client_timeouts_total",)] == 1
    assert found[("fedge_round",)] == 2
    # Round 3 of the history is run again: the counter, already at 3, does not go down.
    assert found[("fedge_rounds_completed_total",)] == 3
    live.round_done(record(3), True)
    live.round_done(record(4), True)
    assert samples(exposition(metrics))[("fedge_rounds_completed_total",)] == 4
    assert json.loads((tmp_path / LIVE_FILE).read_text())["rounds_completed"] == 4


def test_the_live_file_is_rewritten_only_when_something_changed(tmp_path):
    live = LiveState(tmp_path / LIVE_FILE)
    live.connected(3)
    written = (tmp_path / LIVE_FILE).stat().st_mtime_ns, (tmp_path / LIVE_FILE).read_text()
    for _ in range(5):  # the grid counts the nodes at every poll
        live.connected(3)
        live.phase("starting")
    assert ((tmp_path / LIVE_FILE).stat().st_mtime_ns,
            (tmp_path / LIVE_FILE).read_text()) == written


class Fleet:
    """What DeviceFleet.metrics() returns."""

    def __init__(self) -> None:
        self.found = {"known": 4, "seen": 3, "present": 2, "round": 5,
                      "rounds": {"completed": 4, "failed": 1},
                      "results": {"accepted": 10, "rejected": 2, "failed": 1, "late": 1,
                                  "missing": 0},
                      "received_bytes": 5000}

    def metrics(self) -> dict:
        return self.found


def test_the_gateway_serves_its_devices_metrics_over_http():
    fleet = Fleet()
    with serving_metrics("127.0.0.1", 0, GatewayMetrics(fleet)) as port:
        text = scrape(port)
    found = samples(text)
    assert found[("fedge_gateway_devices_known",)] == 4
    assert found[("fedge_gateway_devices_seen",)] == 3
    assert found[("fedge_gateway_devices_present",)] == 2
    assert found[("fedge_gateway_round",)] == 5
    assert found[("fedge_gateway_rounds_total", ("outcome", "completed"))] == 4
    assert found[("fedge_gateway_rounds_total", ("outcome", "failed"))] == 1
    assert found[("fedge_gateway_device_results_total", ("outcome", "accepted"))] == 10
    assert found[("fedge_gateway_device_results_total", ("outcome", "late"))] == 1
    assert found[("fedge_gateway_received_bytes_total",)] == 5000
    assert all(name.startswith("fedge_gateway_") for name in families(text))
    with pytest.raises(OSError):  # stopped with the block
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_bad_metrics_port_is_one_clear_error(monkeypatch):
    with pytest.raises(FedgeError, match="--metrics-port 9092 is the server's --port; "
                                         "choose another"):
        check_metrics_port("127.0.0.1", 9092, {"the server's --port": 9092})
    with pytest.raises(FedgeError, match="--metrics-port 0 is not a port"):
        check_metrics_port("127.0.0.1", 0, {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FedgeError, match=f"port {port} on 127.0.0.1 is already in use; "
                                             "choose another with --metrics-port"):
            check_metrics_port("127.0.0.1", port, {})
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    with pytest.raises(FedgeError, match=r"needs prometheus_client, which is not "
                                         r"installed: pip install 'fedge\[tracking\]'"):
        check_metrics_port("127.0.0.1", 9092, {})
