"""A client on a device: Flower's SuperNode running fedge's ClientApp on local files.

``fedge client`` checks its settings and the device's data file, then starts
``flower-supernode`` against the server (TLS with the operator's CA, and the device's
key for node authentication); Flower then starts :data:`fedge.client.relay.app` for
each message, which hands it to the trainer this process keeps warm, with the data
already loaded. The client supervises its SuperNode and reads what it logs:

- it has **joined** when Flower logs the node id the server gave it;
- **the run finished** when the server's last message says so: the client leaves
  (exit status 0);
- **the server is gone** (restarted, crashed, unreachable) when a joined SuperNode fails
  to reach it: the client tries to rejoin for up to ``join_timeout`` seconds, counted from
  that first failure;
- it **cannot take part** when its samples do not fit the federation's model (learnt
  from the first round's message): it tells the server, says why and leaves;
- it **gives up** when it has not joined within ``join_timeout`` seconds (counted from
  the start, loading the data included, but after one connection attempt at least),
  naming the cause Flower reported.

Every wait on the SuperNode is bounded: one that has given up or has been told to stop
is ended, with everything it started, within seconds (:mod:`fedge.guard`).
"""

import logging
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, RecordDict

from fedge.client.app import CannotTakePart, build_trainer
from fedge.client.data import LocalData, split_train_val
from fedge.client.keys import check_ca_certificate, check_private_key
from fedge.client.relay import Trainer, serve_trainer
from fedge.client.tracking import LocalTracking
from fedge.client.training import check_device
from fedge.client.wire import FOLDER_KEY, check_wire_folder
from fedge.config import default
from fedge.datafiles import load_labelled_data, named_binary_classes
from fedge.errors import FedgeError
from fedge.models.hf import is_pretrained, model_folder
from fedge.processes import Children, flower_command, free_port, relay_output
from fedge.tracking import check_targets

log = logging.getLogger("fedge.client")

JOIN_PROBLEMS = ("the server may not be up yet, this device's key may not be registered "
                 "with it, or TLS settings differ (--ca for a TLS server, --insecure for a "
                 "plaintext one)")
ENDED_GRACE = 5.0  # seconds a SuperNode that has given up gets to exit by itself
FAREWELL_LINGER = 5.0  # seconds to let the SuperNode send its answer to the farewell
# Seconds a SuperNode gets to start and try the server once, even when loading the data
# took the whole join timeout.
FIRST_TRY_BOUND = 30.0
MAX_PAUSE = 30.0  # seconds between attempts to join, at most
# What Flower's SuperNode starts for each message, found by name (fedge.processes).
SUPERNODE_HELPERS = ("flower-superexec", "flwr-clientapp")


@dataclass(frozen=True)
class DeviceData:
    """This device's samples, labelled as the federation's ``task`` has them. A binary
    task's classes keep their names (ids become names too: "0", "1"): the federation's
    (negative, positive) names map them to 0/1 at the first round."""

    path: Path
    label_column: str = default("label_column")
    val_fraction: float = default("val_fraction")
    seed: int = 0
    task: str = default("task")
    # A text model's samples: this CSV column's texts (or an NPZ's strings), tokenized
    # at the first round with the tokenizer of this device's copy of the model.
    text_column: str | None = None

    def load(self) -> LocalData:
        if not 0 < self.val_fraction < 1:
            raise FedgeError(f"--val-fraction must lie between 0 and 1, not "
                             f"{self.val_fraction:g}")
        samples = load_labelled_data(self.path, label_column=self.label_column,
                                     task=self.task, text_column=self.text_column)
        y, names = samples.y, samples.class_names
        if self.task == "binary":
            y, names = named_binary_classes(y, names, self.path)
        return split_train_val(samples.x, y, self.val_fraction, self.seed, class_names=names)


@dataclass(frozen=True)
class Connection:
    """How this device reaches its server: ``server`` is HOST:PORT, ``ca`` the server's
    CA certificate (None: plaintext), ``key`` the device's node-authentication key."""

    server: str
    ca: Path | None = None
    key: Path | None = None
    join_timeout: float = 600.0

    def check(self) -> None:
        """A clear error for settings that can never connect, before anything starts."""
        parse_server_address(self.server)
        if self.join_timeout <= 0:
            raise FedgeError(f"--join-timeout must be positive, not {self.join_timeout:g}")
        if self.ca is not None:
            check_ca_certificate(self.ca)
        if self.key is not None:
            if self.ca is None:
                raise FedgeError("--key needs TLS (--ca): node authentication does not work "
                                 "over a plaintext connection")
            check_private_key(self.key)
        for command in SUPERNODE_HELPERS:
            flower_command(command)


HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]/]+)):(?P<port>\d+)")


def parse_server_address(text: str, option: str = "--server") -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as host and port, or a clear error that
    names the ``option`` it came from."""
    match = HOST_PORT.fullmatch(text.strip())
    port = int(match["port"]) if match else 0
    if not match or not 1 <= port <= 65535:
        raise FedgeError(f"{option} {text!r} is not HOST:PORT with a port in 1..65535 "
                         "(e.g. my.server.example:9092, or [::1]:9092 for IPv6)")
    return match["v6"] or match["host"], port


# What Flower's SuperNode logs when it cannot join, and what it means for the user; the
# last field says for which clients: a TLS client ("tls"), an --insecure one, or any.
JOIN_CAUSES = (
    (re.compile(r"CERTIFICATE_VERIFY_FAILED.*(mismatch|doesn't match)", re.I),
     "the server's TLS certificate is not valid for the name or address in --server "
     "(`fedge certs --host` must name it)", "any"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED", re.I),
     "the server's TLS certificate is not signed by the CA in --ca (give this server's "
     "ca.pem)", "any"),
    (re.compile(r"WRONG_VERSION_NUMBER|record layer failure|packet length too long", re.I),
     "the server does not speak TLS (it runs --insecure): give --insecure instead of --ca",
     "tls"),
    (re.compile(r"Server disconnected without sending a response|illegal request line|"
                r"RemoteProtocolError", re.I),
     "the server speaks TLS: give its ca.pem with --ca instead of --insecure", "insecure"),
    # A TLS client whose connection is cut mid-request: the network, not its settings.
    (re.compile(r"Server disconnected without sending a response|RemoteProtocolError", re.I),
     "the connection to the server was cut (an unreliable network, or the server stopped)",
     "tls"),
    (re.compile(r"SuperNode authentication is enabled", re.I),
     "the server admits only registered devices: give this device's private key with "
     "--key (made by `fedge keys`), and its .pub file to the server's operator", "any"),
    (re.compile(r"No SuperNode found with the given public key|Failed to activate SuperNode",
                re.I),
     "the server does not know this device's key: give its .pub file to the server's "
     "operator (`fedge server --authorized-key`)", "any"),
    (re.compile(r"Connection refused", re.I),
     "nothing accepts connections at that address (the server is not up yet, or the "
     "host or port is wrong)", "any"),
    (re.compile(r"Name or service not known|nodename nor servname|Temporary failure in name "
                r"resolution|No address associated", re.I),
     "the server's host name cannot be resolved", "any"),
    (re.compile(r"timed out|ConnectTimeout", re.I),
     "the server did not answer in time (is a firewall in the way?)", "any"),
)
JOINED = re.compile(r"SuperNode ID: (\d+)")
ENDED = re.compile(r"Giving up reconnection|SuperNode terminated gracefully|Failed to "
                   r"initialize the connection|Exit Code: \d+")
# Flower's retries: each failed request, and the first success after failures.
FAILED = re.compile(r"connection attempt failed", re.I)
RECONNECTED = re.compile(r"Connection successful after")


class SuperNodeWatch:
    """What one SuperNode's output says: whether it has tried the server, joined, lost
    it since, why it could not join, and whether it has given up. Fed every line of that
    output."""

    def __init__(self, tls: bool = True) -> None:
        self.client_kind = "tls" if tls else "insecure"  # which JOIN_CAUSES apply
        self.node_id: int | None = None
        self.cause: str | None = None
        self.tried = False  # it has reached the server, or failed to
        self.lost_at: float | None = None  # joined, then failing to reach the server since
        self.ended_at: float | None = None
        self.sent = 0  # replies sent to the server

    def __call__(self, line: str) -> None:
        if joined := JOINED.search(line):
            self.node_id = int(joined.group(1))
        elif "Sent successfully" in line:
            self.sent += 1
        elif FAILED.search(line) and self.node_id is not None and self.lost_at is None:
            self.lost_at = time.monotonic()
        elif RECONNECTED.search(line):
            self.lost_at = None
        elif ENDED.search(line) and self.ended_at is None:
            self.ended_at = time.monotonic()
        self.tried = self.tried or bool(JOINED.search(line) or FAILED.search(line)
                                        or ENDED.search(line))
        self.cause = next((meaning for pattern, meaning, kind in JOIN_CAUSES
                           if kind in ("any", self.client_kind) and pattern.search(line)),
                          self.cause)


class Session:
    """What this client has learnt from its server; written by the trainer's thread."""

    def __init__(self) -> None:
        self.finished: str | None = None  # the server's summary of its finished run
        self.refusal: str | None = None  # why this device cannot take part

    def trainer(self, trainer: Trainer) -> Trainer:
        """``trainer``, noting when the device's samples cannot fit the model, and
        logging why any other round failed (the server hears it too)."""

        def train(content: RecordDict, context: Context) -> RecordDict:
            try:
                return trainer(content, context)
            except CannotTakePart as error:  # said once, as the client's last word
                self.refusal = str(error)
                raise
            except Exception as error:
                log.error("training failed: %s", error)
                raise

        return train

    def run_finished(self, summary: str) -> None:
        self.finished = summary or "the run is over"


def supernode_args(server: str, ca: Path | None, key: Path | None, node_config: Path,
                   port: int, join_timeout: float) -> list[str]:
    # Flower's SuperNode retries an unreachable server forever unless told otherwise.
    args = [sys.executable, "-m", "fedge.client.supernode", "--superlink", server,
            "--max-wait-time", f"{join_timeout:.1f}",
            "--node-config", str(node_config), "--port", str(port)]
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return args


def run_client(connection: Connection, data: DeviceData, device: str = default("device"),
               record_wire: Path | None = None, verbose: bool = False,
               started: float | None = None, model: str | None = None,
               track: Sequence[str] = ()) -> str:
    """Check the settings and the data, then serve as a SuperNode until the server's run
    finishes (returns the server's summary of it) or this client must stop (FedgeError);
    with ``record_wire``, every reply this device sends is also recorded in that folder
    (see :mod:`fedge.client.wire`). ``verbose`` shows Flower's output unfiltered. The
    join timeout counts from ``started`` (``time.monotonic()``; default: now). ``model``:
    this device's copy of a pretrained model, ``hf:FOLDER``, when the federation trains
    one (whose samples are texts: ``data.text_column``). ``track``: this device's own
    trackers (``--track``) of its local training, which stay on the device."""
    started = time.monotonic() if started is None else started
    connection.check()
    check_device(device)
    wire = None if record_wire is None else check_wire_folder(record_wire)
    base = device_model_folder(model)
    check_targets(list(track))
    samples = data.load()
    log.info("%d training and %d validation samples from %s", len(samples.train_y),
             len(samples.val_y), data.path)
    tracking = (LocalTracking(list(track), f"client {data.path.stem}",
                              {"fedge.data": str(Path(data.path).resolve()),
                               "fedge.server": connection.server}) if track else None)
    status = "FAILED"
    try:
        summary = run_node(connection, build_trainer(lambda context: samples, device, base,
                                                     tracking), wire, verbose, started)
        status = "FINISHED"
        return summary
    finally:
        if tracking:
            tracking.close(status)


def device_model_folder(model: str | None) -> Path | None:
    """This device's copy of the federation's pretrained model (``hf:FOLDER``), checked;
    None for no model: the server's spec names the federation's model."""
    if model is None:
        return None
    if not is_pretrained(model):
        raise FedgeError(f"--model {model}: a device names only its copy of a pretrained "
                         "model, hf:FOLDER; the server sends every other model")
    return model_folder(model)


def run_node(connection: Connection, trainer: Trainer, record_wire: Path | None = None,
             verbose: bool = False, started: float | None = None) -> str:
    """Serve ``trainer`` (train message in, reply out) as one SuperNode of the federation
    at ``connection``, as :func:`run_client` does: ``fedge client`` and ``fedge gateway``
    are both nodes."""
    give_up_at = (time.monotonic() if started is None else started) + connection.join_timeout
    connection.check()
    wire = {} if record_wire is None else {FOLDER_KEY: str(record_wire)}
    session = Session()
    with (tempfile.TemporaryDirectory(prefix="fedge-client-") as workdir,
          serve_trainer(session.trainer(trainer), Path(workdir), session.run_finished)
          as relay_entries):
        node_config = Path(workdir) / "node.toml"
        node_config.write_text(node_config_toml({**relay_entries, **wire}))
        children = Children(env={"FLWR_HOME": workdir})
        with children.running():
            supervisor = Supervisor(children, connection, node_config, session, verbose)
            return supervisor.serve(give_up_at)


class Supervisor:
    """Runs one SuperNode after another until the run finishes or the client must stop."""

    def __init__(self, children: Children, connection: Connection, node_config: Path,
                 session: Session, verbose: bool) -> None:
        self.children, self.connection = children, connection
        self.node_config, self.session, self.verbose = node_config, session, verbose
        self.tried = False  # a SuperNode has tried the server

    def serve(self, give_up_at: float) -> str:
        server, timeout = self.connection.server, self.connection.join_timeout
        pause, lost_at, cause = 1.0, None, None
        while True:
            watch = self._attempt(give_up_at)
            # A last attempt cut short by the timeout may have said nothing yet.
            cause = watch.cause or cause
            if self.session.finished:
                return self.session.finished
            if self.session.refusal:
                raise FedgeError(f"this device cannot take part in the federation at "
                                 f"{server}: {self.session.refusal}")
            now = time.monotonic()
            if watch.node_id is not None:  # it had joined: the server went away
                if watch.lost_at is None:  # it ended without a failed request first
                    self._lost()
                # The join timeout counts from the first failed request: Flower's
                # SuperNode has been retrying since.
                lost_at = watch.lost_at or now
                give_up_at, pause = lost_at + timeout, 1.0
                if now < give_up_at:
                    cause = None  # the next attempts will say what is wrong now
                    continue
            if now >= give_up_at:
                raise FedgeError(self._gave_up(cause, lost_at))
            log.warning("could not join the federation at %s: %s; retrying in %.0f s",
                        server, cause or JOIN_PROBLEMS, pause)
            time.sleep(min(pause, max(0.0, give_up_at - now)))
            pause = min(2 * pause, MAX_PAUSE)

    def _gave_up(self, cause: str | None, lost_at: float | None) -> str:
        server, timeout = self.connection.server, self.connection.join_timeout
        if lost_at is not None:
            return (f"gave up: the server at {server} has not been reachable for "
                    f"{timeout:.0f} s since the connection was lost"
                    + (f" ({cause})" if cause else "")
                    + "; its run may have ended while this client was away")
        return (f"gave up joining the federation at {server} after {timeout:.0f} s: "
                f"{cause or JOIN_PROBLEMS}")

    def _attempt(self, give_up_at: float) -> SuperNodeWatch:
        """One SuperNode, from its start until it has ended (by itself, or stopped by us
        once it has given up, the run has finished or the device cannot take part)."""
        watch = SuperNodeWatch(tls=self.connection.ca is not None)
        max_wait = max(1.0, give_up_at - time.monotonic())
        args = supernode_args(self.connection.server, self.connection.ca,
                              self.connection.key, self.node_config, free_port(), max_wait)
        process = self.children.start(args, capture=True)
        started = time.monotonic()
        output = relay_output(process.stdout, watch, "Flower's SuperNode", self.verbose)
        announced, leaving, lost = False, None, None
        while (process.poll() is None
               and not self._should_end(watch, give_up_at, started, leaving)):
            announced = announced or self._announce(watch)
            if watch.lost_at != lost:  # said once per loss, when it begins
                lost = watch.lost_at
                if lost is not None:
                    self._lost()
                else:
                    log.info("reached the server at %s again", self.connection.server)
            if leaving is None and (self.session.finished or self.session.refusal):
                leaving = (time.monotonic(), watch.sent)
            time.sleep(0.2)
        self.children.end(process)
        output.join(timeout=2.0)
        if not announced:
            self._announce(watch)
        self.tried = self.tried or watch.tried
        return watch

    def _announce(self, watch: SuperNodeWatch) -> bool:
        """Say that the SuperNode has joined, once it has; whether it has."""
        if watch.node_id is not None:
            log.info("joined the federation at %s as node %d", self.connection.server,
                     watch.node_id)
        return watch.node_id is not None

    def _lost(self) -> None:
        log.warning("lost the server at %s; trying to rejoin for up to %.0f s",
                    self.connection.server, self.connection.join_timeout)

    def _should_end(self, watch: SuperNodeWatch, give_up_at: float, started: float,
                    leaving: tuple[float, int] | None) -> bool:
        now = time.monotonic()
        if leaving is not None:  # once it has sent its last answer to the server
            since, sent = leaving
            return watch.sent > sent or now - since > FAREWELL_LINGER
        # Joined, then lost: it retries each request for up to --max-wait-time, and goes
        # on with the next after giving up on one, until the join timeout since the loss.
        if watch.lost_at is not None:
            return now > watch.lost_at + self.connection.join_timeout
        if watch.ended_at is not None:  # Flower's SuperNode can hang after giving up
            return now - watch.ended_at > ENDED_GRACE
        # Flower bounds its own retries by --max-wait-time; this bounds them for sure.
        if watch.node_id is None:  # one try at least, however long the start took
            tried = self.tried or watch.tried
            deadline = give_up_at if tried else max(give_up_at, started + FIRST_TRY_BOUND)
            return now > deadline + ENDED_GRACE
        return False


def node_config_toml(entries: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(f"{key} = {quoted(value)}\n" for key, value in entries.items())
