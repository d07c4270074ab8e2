"""The operator's metrics in Prometheus' text format (``--metrics-port``).

In a deployment the federation runs in a ServerApp process that Flower starts, while
``fedge server`` supervises: :class:`LiveState` observes the run in the ServerApp process
and keeps its state in the run folder (:data:`LIVE_FILE`, written whole at every change),
and :class:`ServerMetrics`, in the ``fedge server`` process, reads that file on each scrape
and adds what only the supervisor knows (whether the SuperLink runs). A gateway is one
process: :class:`GatewayMetrics` reads its :class:`~fedge.server.gateway.DeviceFleet`.
:func:`serving_metrics` serves either on ``/metrics``.

Counters never go down within a serving process: they continue from the run's history
when it resumes. ``prometheus_client`` is optional (``pip install 'fedge[tracking]'``):
it is imported only when metrics are served.
"""

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from fedge.config import step_name
from fedge.errors import FedgeError
from fedge.files import finite_number, write_json
from fedge.models.measures import SCALARS
from fedge.processes import check_port_free
from fedge.server.observers import PHASES, RunObserver, RunStart

log = logging.getLogger("fedge.server")

LIVE_FILE = Path(".flower") / "live.json"  # in the run folder
INSTALL = "pip install 'fedge[tracking]'"
# Upper bounds of FedBuff's staleness histogram (τ: server steps since a client's copy).
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32)
# Counters of the live state: they only grow, and continue from a resumed run's history.
COUNTERS = ("rounds_completed", "client_failures", "client_timeouts", "updates_rejected",
            "received_bytes")


def require_prometheus(option: str = "--metrics-port") -> None:
    """A clear error when ``prometheus_client`` is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise FedgeError(f"{option} needs prometheus_client, which is not installed: "
                         f"{INSTALL}") from None


def check_metrics_port(host: str, port: int, others: Mapping[str, int | None],
                       option: str = "--metrics-port") -> None:
    """Before anything starts: ``port`` is a port, not one of the ``others`` (what each
    is: "the server's --port"), free on ``host``, and ``prometheus_client`` is there to
    serve it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FedgeError(f"{option} {port} is not a port: give one in 1..65535")
    for name, other in others.items():
        if other == port:
            raise FedgeError(f"{option} {port} is {name}; choose another")
    require_prometheus(option)
    check_port_free(host, port, option)


# -- the live state: what the ServerApp process knows, as a JSON file ------------------


def new_state() -> dict:
    """The live state of a run before anything happened."""
    return {"phase": "starting", "status": "running", "run": {}, "round": 0,
            **dict.fromkeys(COUNTERS, 0), "clients_connected": 0, "clients_sampled": 0,
            "validation_loss": None, "validation_measures": {}, "round_seconds": None,
            "epsilon": None, "staleness": {"counts": [0] * (len(STALENESS_BUCKETS) + 1),
                                           "sum": 0, "count": 0}}


def _number(value: object) -> float | None:
    return float(value) if finite_number(value) else None


def add_round(state: dict, record: Mapping[str, Any]) -> None:
    """A round's record (metrics.json's ``rounds``) added to ``state``."""
    count = {key: int(record.get(key) or 0)
             for key in ("num_clients", "failures", "timeouts", "rejected")}
    state["rounds_completed"] += 1
    state["round"] = int(record.get("round") or state["round"])
    state["client_failures"] += count["failures"]
    state["client_timeouts"] += count["timeouts"]
    state["updates_rejected"] += count["rejected"]
    state["clients_sampled"] = sum(count.values())
    per_reply = _number(record.get("bytes_per_client"))
    if per_reply is not None:  # its mean over the replies with content: aggregated or not
        state["received_bytes"] += round(per_reply * (count["num_clients"] + count["rejected"]))
    measured(state, record)
    state["round_seconds"] = _number(record.get("seconds"))
    state["epsilon"] = _number(record.get("epsilon"))


def measured(state: dict, found: Mapping[str, Any]) -> None:
    """The server's latest validation of the global model: its loss and scalar measures."""
    state["validation_loss"] = _number(found.get("val_loss"))
    measures = found.get("val_measures") or {}
    state["validation_measures"] = {name: value for name, value in measures.items()
                                    if isinstance(name, str) and _number(value) is not None}


def add_staleness(state: dict, staleness: Sequence[int]) -> None:
    histogram = state["staleness"]
    for tau in staleness:
        bucket = next((i for i, bound in enumerate(STALENESS_BUCKETS) if tau <= bound),
                      len(STALENESS_BUCKETS))
        histogram["counts"][bucket] += 1
        histogram["sum"] += int(tau)
        histogram["count"] += 1


def state_from_history(run_dir: Path, through: int | None = None) -> dict:
    """The live state of the run folder's history (its metrics.json), through round (or
    FedBuff version) ``through`` if given: where a resumed run's counters continue."""
    state = new_state()
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return state
    if not isinstance(metrics, dict):
        return state

    def kept(records: object, key: str) -> list[dict]:
        return [r for r in records if isinstance(r, dict) and isinstance(r.get(key), int)
                and (through is None or r[key] <= through)] if isinstance(records, list) else []

    rounds = kept(metrics.get("rounds"), "round")
    if not rounds and isinstance(metrics.get("initial"), dict):
        measured(state, metrics["initial"])
    for record in rounds:
        add_round(state, record)
    for version in kept(metrics.get("versions"), "version"):
        add_staleness(state, [tau for tau in version.get("staleness") or []
                              if isinstance(tau, int)])
    return state


class LiveState(RunObserver):
    """Keeps the run's live state in ``path`` (``.flower/live.json``), written whole
    (atomically) whenever it changes, for ``fedge server --metrics-port`` to serve."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = new_state()
        self._written: str | None = None

    def started(self, run: RunStart) -> None:
        if run.resumed_after:
            self.state = {**state_from_history(run.run_dir, run.resumed_after),
                          "phase": self.state["phase"],
                          "clients_connected": self.state["clients_connected"]}
        self.state["run"] = {"run_dir": str(run.run_dir), "strategy": run.config.strategy.name,
                             "task": run.config.task.name, "headline": run.headline,
                             "unit": run.unit, "resumed_after": run.resumed_after}
        self._write()

    def initial(self, measured_now: dict) -> None:
        if not self.state["rounds_completed"]:
            measured(self.state, measured_now)
            self._write()

    def phase(self, phase: str) -> None:
        self.state["phase"] = phase
        self._write()

    def connected(self, nodes: int) -> None:
        self.state["clients_connected"] = int(nodes)
        self._write()

    def round_done(self, record: dict, improved: bool, staleness: Sequence[int] = ()) -> None:
        add_round(self.state, record)
        add_staleness(self.state, staleness)
        self._write()

    def ended(self, status: str, error: str | None = None) -> None:
        self.state["status"] = status
        self.state["phase"] = "finished" if status == "finished" else "failed"
        self._write()

    def _write(self) -> None:
        """The state, unless the file already holds it (nodes are polled often)."""
        text = json.dumps(self.state, sort_keys=True)
        if text == self._written:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**self.state, "pid": os.getpid(), "updated": time.time()})
        self._written = text


def read_live_state(path: Path) -> dict | None:
    """The live state ``path`` holds, or None when there is none (yet)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {**new_state(), **state} if isinstance(state, dict) else None


# -- what a scrape reads --------------------------------------------------------------


class _Monotonic:
    """Counters as Prometheus wants them: never lower than what was already served."""

    def __init__(self) -> None:
        self._served: dict[object, float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: object, value: float) -> float:
        with self._lock:
            value = max(value, self._served.get(key, 0.0))
            self._served[key] = value
            return value


class ServerMetrics:
    """A prometheus_client collector of ``fedge server``: the ServerApp's live state in
    ``run_dir`` (the run folder's history until the ServerApp writes one), the run's
    settings, and ``superlink_up()``."""

    def __init__(self, run_dir: Path, strategy: str, task: str, headline: str,
                 superlink_up: Callable[[], bool]) -> None:
        self.live, self.run_dir = run_dir / LIVE_FILE, run_dir
        self.info = {"run_dir": str(run_dir), "strategy": strategy, "task": task,
                     "headline": headline,
                     "unit": step_name(strategy)}
        self.superlink_up = superlink_up
        self.history = state_from_history(run_dir)  # a resumed run's, before it restarts
        self.counted = _Monotonic()

    def describe(self) -> list:
        return []  # nothing to check at registration: collect() reads files

    def state(self) -> dict:
        live = read_live_state(self.live)
        return live if live is not None else self.history

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        state = self.state()
        info = {**self.info, **{k: str(v) for k, v in state.get("run", {}).items()
                                if k in self.info}}
        family = GaugeMetricFamily("fedge_run_info", "the run fedge server serves: its "
                                   "folder, strategy, task, headline measure and step "
                                   "(round or FedBuff's version)", labels=list(info))
        family.add_metric(list(info.values()), 1)
        yield family
        phase = state.get("phase") if state.get("phase") in PHASES else "starting"
        family = GaugeMetricFamily("fedge_phase", "what the server does now: 1 for the "
                                   "current phase, 0 for the others", labels=["phase"])
        for name in PHASES:
            family.add_metric([name], float(name == phase))
        yield family
        yield GaugeMetricFamily("fedge_superlink_up", "1 while Flower's SuperLink process "
                                "runs, else 0", value=float(bool(self.superlink_up())))
        yield from self._counters(state, CounterMetricFamily)
        yield from self._gauges(state, GaugeMetricFamily)
        if self.info["strategy"] == "fedbuff":
            yield self._staleness(state["staleness"], HistogramMetricFamily)

    def _counters(self, state: dict, counter: type) -> Iterator[object]:
        helps = {
            "rounds_completed": ("fedge_rounds_completed", "rounds (FedBuff: evaluated model "
                                 "versions) completed and recorded, a resumed run's included"),
            "client_failures": ("fedge_client_failures", "training replies that were errors: "
                                "the client failed, or its node was unavailable"),
            "client_timeouts": ("fedge_client_timeouts", "clients sampled that did not "
                                "reply before the round's deadline"),
            "updates_rejected": ("fedge_updates_rejected", "updates the server's screen kept "
                                 "out of aggregation"),
            "received_bytes": ("fedge_received_bytes", "bytes of model updates received "
                               "from clients (the arrays, as sent)"),
        }
        for key, (name, help_text) in helps.items():
            value = _number(state.get(key)) or 0.0
            yield counter(name, help_text, value=self.counted(key, value))

    def _gauges(self, state: dict, gauge: type) -> Iterator[object]:
        yield gauge("fedge_round", "the last completed round (FedBuff: model version); 0 "
                    "before the first", value=_number(state.get("round")) or 0.0)
        yield gauge("fedge_clients_connected", "client nodes connected to the SuperLink, as "
                    "the server last counted them",
                    value=_number(state.get("clients_connected")) or 0.0)
        yield gauge("fedge_clients_sampled", "clients sent the last round's training task "
                    "(FedBuff: since the last evaluation)",
                    value=_number(state.get("clients_sampled")) or 0.0)
        loss = _number(state.get("validation_loss"))
        if loss is not None:
            yield gauge("fedge_validation_loss", "loss of the latest global model on the "
                        "server's validation set (round 0: the starting model)", value=loss)
        family = gauge("fedge_validation_measure", "the task's measures of the latest global "
                       "model on the server's validation set (fedge_run_info's headline "
                       "among them)", labels=["measure"])
        scalars = SCALARS.get(self.info["task"], ())  # not a binary task's threshold
        for name, value in sorted((state.get("validation_measures") or {}).items()):
            if name in scalars and _number(value) is not None:
                family.add_metric([name], float(value))
        yield family
        seconds = _number(state.get("round_seconds"))
        if seconds is not None:
            yield gauge("fedge_round_duration_seconds", "how long the last completed round "
                        "took", value=seconds)
        epsilon = _number(state.get("epsilon"))
        if epsilon is not None:
            yield gauge("fedge_privacy_epsilon", "differential privacy spent so far (ε at "
                        "the run's δ)", value=epsilon)

    def _staleness(self, histogram: dict, family: type) -> object:
        counts = list(histogram.get("counts") or [])
        counts += [0] * (len(STALENESS_BUCKETS) + 1 - len(counts))
        buckets, total = [], 0.0
        for i, bound in enumerate([*(str(float(b)) for b in STALENESS_BUCKETS), "+Inf"]):
            total = self.counted(("staleness", bound), total + counts[i])
            buckets.append((bound, total))
        return family("fedge_fedbuff_staleness", "staleness τ of the updates FedBuff "
                      "aggregated: server steps since the client's copy",
                      buckets=buckets,
                      sum_value=self.counted("staleness_sum",
                                             _number(histogram.get("sum")) or 0.0))


class GatewayMetrics:
    """A prometheus_client collector of a gateway's devices (``fleet.metrics()``)."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet
        self.counted = _Monotonic()

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        found = self.fleet.metrics()
        for name, key, help_text in (
            ("fedge_gateway_devices_known", "known", "devices whose tokens the gateway "
             "holds"),
            ("fedge_gateway_devices_seen", "seen", "devices that have said hello since the "
             "gateway started"),
            ("fedge_gateway_devices_present", "present", "devices polling, or seen in the "
             "last few seconds"),
            ("fedge_gateway_round", "round", "the last round the gateway ran for the "
             "server; 0 before the first"),
        ):
            yield GaugeMetricFamily(name, help_text, value=float(found[key]))
        family = CounterMetricFamily("fedge_gateway_rounds", "rounds the gateway ran for "
                                     "the server, by outcome: completed (enough device "
                                     "results) or failed", labels=["outcome"])
        for outcome in ("completed", "failed"):
            family.add_metric([outcome], self.counted(("rounds", outcome),
                                                      found["rounds"][outcome]))
        yield family
        family = CounterMetricFamily("fedge_gateway_device_results", "devices' answers to "
                                     "round tasks, by outcome: accepted, rejected (by the "
                                     "screen), failed (the device said so), late, missing "
                                     "(took the task, never answered)", labels=["outcome"])
        for outcome in ("accepted", "rejected", "failed", "late", "missing"):
            family.add_metric([outcome], self.counted(("results", outcome),
                                                      found["results"][outcome]))
        yield family
        yield CounterMetricFamily("fedge_gateway_received_bytes", "bytes of result bodies "
                                  "devices sent", value=self.counted(
                                      "bytes", found["received_bytes"]))


# -- serving ------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer's own looks the host up in DNS (getfqdn), which may hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()


@contextlib.contextmanager
def serving_metrics(host: str, port: int | None, *collectors: object,
                    option: str = "--metrics-port") -> Iterator[int | None]:
    """Serve ``collectors`` in Prometheus' text format on ``host:port`` (any path;
    ``/metrics`` by convention) until the block ends; yields the bound port. With
    ``port`` None, serves nothing."""
    if port is None:
        yield None
        return
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    server_class = type("MetricsServer", (_MetricsServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    try:
        server = make_server(host, port, make_wsgi_app(registry), server_class,
                             handler_class=_QuietHandler)
    except (OSError, OverflowError) as error:
        raise FedgeError(f"cannot serve metrics on {host}:{port} ({option}): "
                         f"{getattr(error, 'strerror', None) or error}") from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"fedge-metrics-{port}", daemon=True)
    thread.start()
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("Prometheus metrics on http://%s:%d/metrics", shown, bound)
    try:
        yield bound
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
