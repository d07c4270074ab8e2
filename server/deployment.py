"""The server on a host: Flower's SuperLink plus a ``flwr run`` of fedge's ServerApp.

``fedge server`` checks everything it can (settings, certificates, keys, ports, data
files, the run folder and its checkpoint), then starts ``flower-superlink`` (TLS and node
authentication on unless ``--insecure``), registers the public keys of the devices
allowed to join, submits the run with ``flwr run`` and streams its log; Flower runs
:data:`app` in a ServerApp process that writes the run folder exactly as a simulation
does, resuming from its checkpoint when the folder already holds one, and tells the
clients when the run has finished. A run the ServerApp has to stop (too few clients)
is reported by ``fedge server`` as its own error, with what a restart will do.
"""

import json
import logging
import subprocess
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel

from fedge.config import RunConfig
from fedge.datafiles import (
    binary_labels,
    count_classes,
    label_columns,
    load_labelled_data,
    united_class_names,
)
from fedge.errors import FedgeError
from fedge.files import write_atomic, write_json
from fedge.logs import LogFormat, show_fedge_logs
from fedge.models.hf import PREFIX, is_pretrained, model_folder, token_ids
from fedge.models.measures import HEADLINE, test_headline
from fedge.models.source import with_file_path
from fedge.processes import Children, check_listen_host, check_port_free, flower_command
from fedge.protocol import CONFIG, FEDGE_NODE, RUN_FINISHED, SUMMARY_KEY
from fedge.server.certs import (
    check_authorized_key,
    check_certificate_names,
    check_server_certificates,
)
from fedge.server.checkpoint import load_checkpoint
from fedge.server.federation import Federation, ServerData, check_server_settings
from fedge.server.grid import GridWrapper
from fedge.server.observers import RunObserver
from fedge.server.operator_metrics import (
    LIVE_FILE,
    LiveState,
    ServerMetrics,
    check_metrics_port,
    serving_metrics,
)
from fedge.server.run_folder import run_failure, run_finished, server_checkpoint
from fedge.server.superlink import (
    CONNECTION,
    host_port,
    local_address,
    start_superlink,
    stream_run,
    write_app,
)
from fedge.tracking import with_absolute_place

log = logging.getLogger("fedge.server")

# Why the ServerApp stopped a run early, for `fedge server` to report (JSON).
STOPPED_FILE = Path(".flower") / "stopped.json"
# The last message to every client (fedge.client.relay answers it): a query whose config
# carries a one-line summary of the finished run. A node that answered without the
# FEDGE_NODE record runs another ClientApp, which would raise on it: it is not sent.
FAREWELL_TIMEOUT = 10.0  # seconds the finished server waits for clients to acknowledge
SERVERAPP, CLIENTAPP = "fedge.server.deployment:app", "fedge.client.relay:app"
# Flower's commands a server runs: fedge starts the first two, Flower the others.
SERVER_COMMANDS = ("flower-superlink", "flwr", "flower-superexec", "flwr-serverapp")


class ServerSettings(BaseModel):
    """What the ServerApp process needs, handed over as one JSON file."""

    config: RunConfig
    val_data: Path
    test_data: Path | None = None
    run_dir: Path
    log_format: LogFormat = "text"
    live_state: bool = False  # keep .flower/live.json for `fedge server --metrics-port`


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    certs: Path | None  # folder with ca.pem, server.pem, server.key; None: --insecure
    authorized_keys: tuple[Path, ...] = ()
    health_port: int | None = None
    metrics_port: int | None = None  # Prometheus' text format, on the same host


def load_server_data(settings: ServerSettings) -> ServerData:
    """Held-out samples from files: validation for early stopping, test for the report
    (the validation file doubles as test set when no test file is given), labelled as
    the task has them; a binary task's positive class is ``[task] positive``, by default
    the rarest class in the validation data."""
    data, task = settings.config.data, settings.config.task
    text_model = settings.config.model.name if is_pretrained(settings.config.model.name) else None
    read = {"sample_shape": data.input_shape, "label_column": data.label_column,
            "task": task.name, "text_column": data.text_column if text_model else None}
    val = load_labelled_data(settings.val_data, **read)
    test = load_labelled_data(settings.test_data, **read) if settings.test_data else val
    if text_model is not None:  # one length for both: the longest text's by default
        val_ids, test_ids = token_ids([val.x, test.x], model_folder(text_model),
                                      data.max_length)
        val, test = replace(val, x=val_ids), replace(test, x=test_ids)
    test_file = settings.test_data or settings.val_data
    names, (val_y, test_y) = united_class_names([(val, settings.val_data), (test, test_file)])
    if task.name == "binary":
        (val_y, test_y), names = binary_labels(
            [val_y, test_y], names, task.positive, val_y,
            f"the server's data ({settings.val_data}, {test_file})")
    found = count_classes(names, [val_y, test_y])
    num_classes = data.num_classes or found
    if names and num_classes != found:
        raise FedgeError(f"num_classes {num_classes} does not match the {found} classes "
                         f"the server's data names: {', '.join(names)}")
    if val_y.ndim == 2 and num_classes != found:  # a label matrix: one output per column
        raise FedgeError(f"num_classes {num_classes} does not match the {found} "
                         f"{'labels' if task.name == 'multilabel' else 'targets'} of the "
                         "server's data")
    vocab = None  # token-id inputs: the largest id seen sets the embedding size
    if np.issubdtype(val.x.dtype, np.integer):
        vocab = int(max(val.x.max(), test.x.max())) + 1
    return ServerData(val.x, val_y, test.x, test_y, num_classes, vocab_size=vocab,
                      class_names=names, source=f"validation data {settings.val_data}, test "
                                                f"data {test_file}",
                      non_feature_columns=label_columns(data.label_column, task.name))


def federation_for(settings: ServerSettings,
                   observers: Sequence[RunObserver] = ()) -> Federation:
    """A new run, or the continuation of the interrupted run in ``settings.run_dir``;
    every check of the settings, the data files and the run folder happens here."""
    config = settings.config
    if config.model.name is None:
        raise FedgeError("the server needs a model: --model (cnn, mlp, sensor1d, tinytext, "
                         "FILE.py:NAME or package.module:NAME) or model in --config")
    check_server_settings(config)  # the settings first: they need no file
    checkpoint = server_checkpoint(settings.run_dir)
    resume = load_checkpoint(checkpoint) if checkpoint else None
    return Federation(config, load_server_data(settings), settings.run_dir, resume=resume,
                      observers=observers, command="server")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings_file = Path(str(context.run_config["settings"]))
    settings = ServerSettings.model_validate_json(settings_file.read_text())
    show_fedge_logs(settings.log_format)
    other_clientapps = OtherClientApps(grid)
    try:
        observers = ([LiveState(settings.run_dir / LIVE_FILE)]
                     if settings.live_state else [])
        outcome = federation_for(settings, observers).run(other_clientapps)
    except FedgeError as error:  # `fedge server` reports it, as its own error
        write_json(settings.run_dir / STOPPED_FILE, {"error": str(error)})
        return
    summary = test_headline(settings.config.task.name, outcome.test)
    announce_run_finished(grid, f"best round {outcome.best_round}: {summary}",
                          other_clientapps.nodes)


class OtherClientApps(GridWrapper):
    """Delegates to ``grid``, noting the nodes known to run another ClientApp than fedge's:
    those that answered with content but without the FEDGE_NODE record."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.nodes: set[int] = set()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._noted(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._noted(self.grid.send_and_receive(messages, timeout=timeout))

    def _noted(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.nodes.update(reply.metadata.src_node_id for reply in replies
                          if reply.has_content() and FEDGE_NODE not in reply.content)
        return replies


def announce_run_finished(grid: Grid, summary: str, other_clientapps: Collection[int],
                          timeout: float = FAREWELL_TIMEOUT) -> None:
    """Tell every connected client that the run is over, so that it leaves instead of
    waiting for a server that is gone; waits at most ``timeout`` s for their answers.
    Nodes in ``other_clientapps`` are not told: their ClientApp would raise on a message it
    does not know. A node never heard from is told: a fedge client whose every result was
    late must not wait for a server that is gone."""
    connected = list(grid.get_node_ids())
    nodes = [node for node in connected if node not in other_clientapps]
    if not nodes:
        return
    content = RecordDict({CONFIG: ConfigRecord({SUMMARY_KEY: summary})})
    messages = [Message(content, node, RUN_FINISHED, ttl=timeout) for node in nodes]
    try:
        pending = {i for i in grid.push_messages(messages) if i}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
            time.sleep(0.2)
    except Exception as error:  # the run is complete and saved: a farewell is a courtesy
        log.warning("could not tell the clients that the run finished: %s", error)
        return
    log.info("told %d clients that the run finished (%d did not answer within %.0f s); "
             "not told: %d nodes that run another ClientApp", len(nodes), len(pending),
             timeout, len(connected) - len(nodes))


def superlink_args(listener: Listener) -> list[str]:
    args = ["--host", listener.host,
            "--port", str(listener.port), "--disable-runtime-dependency-installation"]
    if listener.certs is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(listener.certs / "ca.pem"),
                 "--ssl-certfile", str(listener.certs / "server.pem"),
                 "--ssl-keyfile", str(listener.certs / "server.key"),
                 "--enable-supernode-auth"]
    if listener.health_port:
        args += ["--health-server-address", host_port(listener.host, listener.health_port)]
    return args


def _absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with its model file and initial weights as absolute paths: Flower runs
    the ServerApp in a process of its own, in a folder of its own."""
    update: dict[str, object] = {}
    if config.tracking.track:
        update["track"] = [with_absolute_place(value) for value in config.tracking.track]
    if config.model.init:
        update["init"] = str(Path(config.model.init).resolve())
    if is_pretrained(config.model.name):
        update["model"] = PREFIX + str(model_folder(config.model.name))
    elif config.model.name:
        update["model"] = with_file_path(config.model.name, Path.resolve)
    return config.updated(**update)


def check_listener(listener: Listener) -> None:
    """The address, certificates, keys and ports, checked before anything starts."""
    check_listen_host(listener.host, "--host")
    if listener.certs is not None:
        check_server_certificates(listener.certs)
        # Flower's own processes and fedge's `flwr` commands dial the SuperLink there.
        check_certificate_names(listener.certs, local_address(listener.host),
                                f"--host {listener.host}")
        if not listener.authorized_keys:  # the SuperLink would wait for clients it refuses
            raise FedgeError("a TLS server admits only the clients whose public keys it is "
                             "given, and it was given none: give each client's .pub file "
                             "(made by `fedge keys`) with --authorized-key")
    elif listener.authorized_keys:
        raise FedgeError("--authorized-key needs TLS (--certs): an --insecure server "
                         "cannot authenticate clients")
    for key in listener.authorized_keys:
        check_authorized_key(key)
    if listener.health_port == listener.port:
        raise FedgeError(f"--health-port {listener.port} is the server's --port; choose "
                         "another")
    check_port_free(listener.host, listener.port, "--port")
    if listener.health_port:
        check_port_free(listener.host, listener.health_port, "--health-port")
    if listener.metrics_port is not None:
        check_metrics_port(listener.host, listener.metrics_port,
                           {"the server's --port": listener.port,
                            "the server's --health-port": listener.health_port})
    for command in SERVER_COMMANDS:
        flower_command(command)


def serve(settings: ServerSettings, listener: Listener, startup_timeout: float = 60.0,
          verbose: bool = False) -> None:
    """Run the SuperLink and the federation until the run ends; SIGTERM stops both, and
    the run folder keeps the last completed round for a restart to resume from.

    Everything that can be checked (settings, certificates, keys, ports, data files, the
    run folder and its checkpoint) is checked before anything is written or started.
    """
    check_listener(listener)
    run_dir = settings.run_dir.resolve()
    settings = settings.model_copy(update={"run_dir": run_dir,
                                           "config": _absolute_paths(settings.config),
                                           "live_state": listener.metrics_port is not None})
    federation_for(settings)
    flower_home = run_dir / ".flower"
    try:
        app_dir = write_app(flower_home, SERVERAPP, CLIENTAPP, listener.port,
                            None if listener.certs is None else listener.certs / "ca.pem",
                            host=local_address(listener.host))
    except OSError as error:
        raise FedgeError(f"cannot make the run folder {run_dir}: {error.strerror}") from None
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    (run_dir / LIVE_FILE).unlink(missing_ok=True)  # a previous server's
    settings_file = flower_home / "server-settings.json"
    write_atomic(settings_file, settings.model_dump_json(indent=2).encode())

    superlink_log = run_dir / "superlink.log"
    children = Children(env={"FLWR_HOME": str(flower_home)})
    started: list[subprocess.Popen] = []  # the SuperLink, once it listens
    metrics = ServerMetrics(run_dir, settings.config.strategy.name, settings.config.task.name,
                            HEADLINE[settings.config.task.name],
                            lambda: bool(started) and started[0].poll() is None)
    with serving_metrics(listener.host, listener.metrics_port, metrics), children.running():
        superlink = start_superlink(children, superlink_args(listener), listener.port,
                                    superlink_log, startup_timeout,
                                    host=local_address(listener.host))
        started.append(superlink)
        log.info("SuperLink listening on %s (%s)", host_port(listener.host, listener.port),
                 "INSECURE" if listener.certs is None else "TLS, node authentication")
        for key in listener.authorized_keys:
            _register(key, children.env)
        status = stream_run(children, app_dir, superlink, superlink_log, settings_file,
                            verbose=verbose, advice=lambda: resume_advice(run_dir))
    _check_outcome(run_dir, status, superlink_log)


def _check_outcome(run_dir: Path, status: int, superlink_log: Path) -> None:
    """A clear error unless the run finished: the ServerApp's own, or what is known."""
    stopped = run_dir / STOPPED_FILE
    if stopped.exists():
        error = json.loads(stopped.read_text())["error"]
        raise FedgeError(f"{error}; {resume_advice(run_dir)}")
    if not run_finished(run_dir):
        raise FedgeError(f"the run ended before it finished (`flwr run` exited with status "
                         f"{status}; see {superlink_log}); {resume_advice(run_dir)}")


def resume_advice(run_dir: Path) -> str:
    """What starting the server again on ``run_dir`` will do."""
    if run_failure(run_dir):
        return "the run cannot go on: start a new one with another --out"
    if not (run_dir / "checkpoint.pt").exists():
        return "no round had completed, so starting the server again starts the run anew"
    rounds = json.loads((run_dir / "metrics.json").read_text()).get("rounds") or [{}]
    return (f"the run folder keeps round {rounds[-1].get('round', '?')}: starting the server "
            f"again on {run_dir} resumes the run")


def _register(key: Path, env: dict[str, str]) -> None:
    result = subprocess.run([flower_command("flwr"), "supernode", "register", str(key),
                             CONNECTION], env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FedgeError(f"could not register client key {key}: "
                         f"{(result.stdout + result.stderr).strip()}")
    log.info("registered client key %s", key.name)
