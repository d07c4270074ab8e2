"""The edge gateway's device side: devices without Python train over HTTPS.

Toward the federation the gateway is one Flower client node (its adapter calls
:meth:`DeviceFleet.run_round` once per round); toward devices it serves the protocol in
``client/device/PROTOCOL.md``. Each round's task goes to every device that asks for it; the
round waits until every device that took it, or is polling, has answered (a result or a
failure) or its deadline passes, then averages the accepted results weighted by their
examples. A result is screened before it counts, as the server screens its clients: it must
be for the round's train program, carry exactly the trained (not frozen) state entries with
the task's shapes as finite float32, and a positive integer ``num_examples``.

Devices authenticate with bearer tokens made by :func:`make_tokens`; the gateway keeps only
their SHA-256 digests. stdlib HTTP and TLS, numpy; every wait is bounded, and no thread
outlives :meth:`DeviceFleet.serving`.
"""

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, urlsplit

import numpy as np

from fedge.errors import FedgeError
from fedge.files import check_output_folder, refuse_overwrite, write_all_or_none
from fedge.models.blob import pack, read_json, unpack
from fedge.protocol import DEVICES_KEY

log = logging.getLogger("fedge.gateway")

MAX_RESULT_BYTES = 64 * 2**20  # a result blob; larger ones get 413 unread
MAX_JSON_BYTES = 2**20  # a hello or a failure
IDLE_SECONDS = 30.0  # a connection's socket timeout: an idle keep-alive, a stalled upload
# A device that made a request this recently counts as present: a round ends early only
# once every present device (and every one that took the task) has answered.
PRESENCE_SECONDS = 5.0
PRESENCE_CHECK = 0.25  # how often a waiting round looks whether presence has lapsed
MAX_EXAMPLES = 2**53  # num_examples beyond it would not be exact as a float64 weight
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
TASK_PATH = re.compile(r"/v1/tasks/([^/]+)/(weights|result|failure)")
PROGRAM_PATH = re.compile(r"/v1/programs/([^/]+)")
JSON_TYPE, BLOB_TYPE = "application/json", "application/octet-stream"


def _finite_number(value: object) -> bool:
    """A number a float holds, finite (an int too large for a float is not one)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _size(text: str) -> int | None:
    """A Content-Length's number of bytes, or None when it is not one: ASCII digits only
    (int() would take "²" and "+5", or fail on thousands of digits)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def _one_line(value: object, limit: int) -> str:
    """Text a device sent, safe for one log or error line."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True)
class GatewaySettings:
    round_deadline: float = 60.0  # seconds a round waits for device results
    min_devices: int = 1  # results a round needs, else it fails
    poll_seconds: float = 20.0  # the longest a GET /v1/task long-poll waits

    def __post_init__(self) -> None:
        for name in ("round_deadline", "poll_seconds"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                raise FedgeError(f"gateway {name} must be a positive number of seconds, "
                                 f"got {value!r}")
        if (not isinstance(self.min_devices, int) or isinstance(self.min_devices, bool)
                or self.min_devices < 1):
            raise FedgeError(f"gateway min_devices must be a positive integer, got "
                             f"{self.min_devices!r}")


# -- tokens -------------------------------------------------------------------------------

def token_digest(token: str) -> str:
    """The SHA-256 hex digest of a token, which is all the gateway keeps of it."""
    return hashlib.sha256(token.encode()).hexdigest()


def make_tokens(names: Sequence[str], out_dir: Path) -> list[Path]:
    """For each device name, ``NAME.token`` (the secret, for the device: 32 random bytes as
    URL-safe text, no newline; mode 0600) and ``NAME.sha256`` (its SHA-256 hex digest, for
    the gateway). Returns the files written, each name's token then its digest. Names are
    checked and nothing is overwritten: a refused call writes nothing."""
    names = list(names)
    if not names:
        raise FedgeError("give at least one device name to make tokens for")
    for name in names:
        _check_device_name(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FedgeError(f"device names must differ; given more than once: "
                         f"{', '.join(duplicates)}")
    check_output_folder(out_dir)
    files: dict[Path, tuple[bytes, int]] = {}
    for name in names:
        token = secrets.token_urlsafe(32)
        files[out_dir / f"{name}.token"] = (token.encode(), 0o600)
        files[out_dir / f"{name}.sha256"] = (f"{token_digest(token)}\n".encode(), 0o644)
    refuse_overwrite(files)
    write_all_or_none(files)
    return list(files)


def read_token_digests(folder: Path) -> dict[str, str]:
    """Device name -> token digest, from every ``NAME.sha256`` in ``folder``."""
    if not folder.is_dir():
        raise FedgeError(f"token folder {folder} does not exist; make the devices' tokens "
                         "with `fedge tokens`")
    digests: dict[str, str] = {}
    for path in sorted(folder.glob("*.sha256")):
        name = path.name.removesuffix(".sha256")
        if not DEVICE_NAME.fullmatch(name):
            raise FedgeError(f"{path}: {name!r} is not a device name (letters, digits, "
                             "'_', '.', '-')")
        try:
            text = path.read_bytes().decode("ascii").strip()
        except OSError as error:
            raise FedgeError(f"cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            text = ""
        if not HEX_DIGEST.fullmatch(text):
            raise FedgeError(f"{path} does not hold a SHA-256 hex digest (64 hex digits); "
                             "`fedge tokens` writes them")
        digests[name] = text.lower()
    if not digests:
        raise FedgeError(f"{folder} holds no NAME.sha256 token digests; make the devices' "
                         "tokens with `fedge tokens`")
    return digests


def _check_device_name(name: object) -> None:
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise FedgeError(f"{name!r} is not a device name: use 1 to 100 letters, digits, "
                         "'_', '.' or '-'")


# -- rounds -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]  # weighted (by num_examples) average of accepted results
    num_examples: int  # total over accepted results
    metrics: dict[str, float]  # device metrics averaged by num_examples; train_seconds max
    report: dict[str, str]  # device -> accepted | late | rejected: .. | failed: .. | no result


@dataclass
class _Device:
    hello: bool = False
    samples: int | None = None
    last_seen: float = -math.inf
    polling: int = 0  # long-polls in progress


@dataclass
class _Accepted:
    num_examples: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclass
class _Round:
    number: int
    task: str
    manifest: dict
    training: dict
    seed: int
    train_sha: str
    weights: bytes  # the blob every device downloads
    trained: dict[str, tuple[int, ...]]  # the arrays a result carries: name -> shape
    deadline: float  # time.monotonic()
    taken: set[str] = field(default_factory=set)
    answers: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, _Accepted] = field(default_factory=dict)
    closed: bool = False


class _Refusal(Exception):
    """An HTTP answer other than success: status and the one line saying why."""

    def __init__(self, status: int, reason: str, close: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


class DeviceFleet:
    """The devices behind one gateway: serves them the protocol and runs their rounds."""

    def __init__(self, tokens: Mapping[str, str],
                 settings: GatewaySettings = GatewaySettings()) -> None:
        if not tokens:
            raise FedgeError("the gateway knows no devices: give it their token digests")
        digests: dict[str, str] = {}
        for name, digest in tokens.items():
            _check_device_name(name)
            if not isinstance(digest, str) or not HEX_DIGEST.fullmatch(digest):
                raise FedgeError(f"device {name}'s token digest is not 64 hex digits")
            digests[name] = digest.lower()
        shared = sorted(name for name, digest in digests.items()
                        if list(digests.values()).count(digest) > 1)
        if shared:
            raise FedgeError(f"devices {', '.join(shared)} share one token; each device "
                             "needs its own")
        self.settings = settings
        self._digests = digests
        self._devices = {name: _Device() for name in digests}
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._past: dict[str, int] = {}  # task ids of closed rounds -> their round
        self._programs: dict[str, bytes] = {}
        self._finished: str | None = None
        self._serving = False
        self._closing = False

    # -- the federation's side ----------------------------------------------------------

    @contextmanager
    def serving(self, host: str, port: int, certfile: Path | None,
                keyfile: Path | None) -> Iterator[int]:
        """Serve the protocol (TLS unless ``certfile`` is None) until the block ends;
        yields the bound port (``port`` 0 binds a free one). On exit every request in
        progress is cut, every thread ended and the socket closed."""
        context = None
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as error:
                raise FedgeError(f"cannot load the gateway's certificate {certfile} and key "
                                 f"{keyfile}: {getattr(error, 'strerror', None) or error}"
                                 ) from None
        with self._cond:
            if self._serving:
                raise FedgeError("this gateway is already serving its devices")
            self._serving, self._closing = True, False
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = _Server((host, port), self, context, family)
        except (OSError, OverflowError) as error:
            with self._cond:
                self._serving = False
            raise FedgeError(f"the gateway cannot listen on {host}:{port}: "
                             f"{getattr(error, 'strerror', None) or error}") from None
        bound = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name=f"fedge-gateway-{bound}")
        thread.start()
        log.info("gateway serving devices on %s:%d (%s)", host, bound,
                 "TLS" if context else "plaintext, insecure")
        try:
            yield bound
        finally:
            with self._cond:
                self._serving, self._closing = False, True
                self._cond.notify_all()  # long-polls and a waiting round end now
            server.shutdown()
            thread.join()
            server.cut_connections()
            server.server_close()  # joins every connection's thread

    def run_round(self, server_round: int, manifest: dict, programs: Mapping[str, bytes],
                  arrays: Mapping[str, np.ndarray], training: Mapping[str, object]
                  ) -> RoundResult:
        """Publish round ``server_round``'s task, wait for the devices' answers (at most
        the round deadline), and average the accepted results. Raises FedgeError when
        fewer than ``min_devices`` results were accepted."""
        prepared = _prepare_round(server_round, manifest, programs, arrays, training)
        with self._cond:
            if not self._serving:
                raise FedgeError("the gateway is not serving its devices: run rounds inside "
                                 "DeviceFleet.serving()")
            if self._finished is not None:
                raise FedgeError(f"round {server_round}: the run is already finished")
            if self._round is not None and not self._round.closed:
                raise FedgeError(f"round {server_round} cannot start while round "
                                 f"{self._round.number} is still running")
            task = f"r{server_round}-{secrets.token_hex(3)}"
            while task in self._past:
                task = f"r{server_round}-{secrets.token_hex(3)}"
            self._programs.update(prepared.pop("programs"))
            current = _Round(task=task, deadline=time.monotonic() + self.settings.round_deadline,
                             **prepared)
            self._round = current
            self._cond.notify_all()
            while True:
                now = time.monotonic()
                if self._closing or now >= current.deadline or self._all_answered(current, now):
                    break
                self._cond.wait(min(current.deadline - now, PRESENCE_CHECK))
            current.closed = True
            current.weights = b""
            self._past[task] = server_round
            report = {name: current.answers.get(name, "no result")
                      for name in sorted(current.taken | set(current.answers))}
            accepted = dict(sorted(current.accepted.items()))
            current.accepted.clear()
            said_hello = sum(device.hello for device in self._devices.values())
        counts, outcomes = self._summary(report, accepted, said_hello)
        others = [outcome for outcome in outcomes if not outcome.endswith(" accepted")]
        log.info("round %d: %s%s", server_round, counts, "".join(f"; {o}" for o in others))
        if len(accepted) < self.settings.min_devices:
            raise FedgeError(f"round {server_round} failed: {counts}, fewer than the "
                             f"{self.settings.min_devices} it needs (min_devices); "
                             + "; ".join(outcomes))
        return _aggregate(accepted, current.trained, report)

    def finish(self, summary: str) -> None:
        """The run is over: every GET /v1/task from now on answers 410 with ``summary``."""
        with self._cond:
            self._finished = str(summary)
            self._cond.notify_all()

    def _all_answered(self, current: _Round, now: float) -> bool:
        """Whether every device the round waits for has answered: each that took the task
        and each that is present (polling, or seen within PRESENCE_SECONDS)."""
        waiting_for = current.taken | {
            name for name, device in self._devices.items()
            if device.polling or now - device.last_seen <= PRESENCE_SECONDS}
        return bool(waiting_for) and waiting_for <= current.answers.keys()

    def _summary(self, report: dict[str, str], accepted: dict[str, _Accepted],
                 said_hello: int) -> tuple[str, list[str]]:
        """A round's counts ("2 of 3 devices returned results (1150 + 1100 examples)")
        and each device's outcome ("dev3 rejected: ..."), or why there are none."""
        counts = (f"{len(accepted)} of {len(report)} device{'' if len(report) == 1 else 's'} "
                  "returned results")
        if accepted:
            counts += f" ({' + '.join(str(a.num_examples) for a in accepted.values())} examples)"
        outcomes = [f"{name} {outcome}" for name, outcome in report.items()]
        if not report:
            outcomes = [f"no device took its task within {self.settings.round_deadline:g} s "
                        f"({said_hello} of {len(self._devices)} devices have said hello)"]
        return counts, outcomes

    # -- the devices' side (called by the request handler) ------------------------------

    def _authenticate(self, header: str | None) -> str | None:
        """The device whose token the Authorization header presents, if any."""
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        found = None
        for name, known in self._digests.items():  # no early exit: the same work for all
            if hmac.compare_digest(digest, known):
                found = name
        return found

    def _seen(self, name: str) -> None:
        with self._cond:
            self._devices[name].last_seen = time.monotonic()

    def _hello(self, name: str, body: object) -> dict:
        samples = body.get("samples") if isinstance(body, dict) else None
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise _Refusal(400, 'hello needs "samples": the number of the device\'s local '
                                "samples")
        with self._cond:
            device = self._devices[name]
            first, device.hello, device.samples = not device.hello, True, samples
        if first:
            described = ", ".join(_one_line(body.get(key), 60) for key in ("runtime", "client")
                                  if isinstance(body.get(key), str))
            log.info("device %s said hello: %d samples%s", name, samples,
                     f" ({described})" if described else "")
        poll = self.settings.poll_seconds
        return {"device": name, "poll_seconds": int(poll) if float(poll).is_integer() else poll}

    def _next_task(self, name: str, wait: float) -> tuple[int, dict | None]:
        """(200, the task) once there is one for ``name``, or (204, None) after ``wait``
        seconds; (410, the summary) once the run is finished."""
        end = time.monotonic() + wait
        with self._cond:
            device = self._devices[name]
            device.polling += 1
            try:
                while True:
                    now = time.monotonic()
                    if self._finished is not None:
                        return 410, {"finished": self._finished}
                    if self._closing:
                        return 204, None
                    current = self._round
                    if (current is not None and not current.closed
                            and name not in current.answers and now < current.deadline):
                        current.taken.add(name)
                        return 200, self._task_for(current, name, now)
                    if now >= end:
                        return 204, None
                    self._cond.wait(end - now)
            finally:
                device.polling -= 1
                device.last_seen = time.monotonic()

    @staticmethod
    def _task_for(current: _Round, name: str, now: float) -> dict:
        return {"task": current.task, "round": current.number, "manifest": current.manifest,
                "training": {**current.training, "seed": device_seed(current.seed, name)},
                "deadline_seconds": round(current.deadline - now, 3)}

    def _program(self, sha256: str) -> bytes:
        with self._cond:
            program = self._programs.get(sha256.lower())
        if program is None:
            raise _Refusal(404, f"no program {_one_line(sha256, 80)}")
        return program

    def _given(self, name: str, task: str) -> _Round:
        """The round of ``task`` if it is open and ``name`` took it (hold the lock)."""
        current = self._round
        if current is None or current.task != task:
            if task in self._past:
                raise _Refusal(409, f"round {self._past[task]} is over: its results were "
                                    "aggregated")
            raise _Refusal(404, f"no task {_one_line(task, 40)}")
        if current.closed:
            raise _Refusal(409, f"round {current.number} is over: its results were aggregated")
        if name not in current.taken:
            raise _Refusal(404, f"task {task} was not given to {name}")
        return current

    def _weights(self, name: str, task: str) -> bytes:
        with self._cond:
            return self._given(name, task).weights

    def _open_for_answer(self, name: str, task: str) -> _Round:
        """The round ``name`` may still answer ``task`` in: 404 or 409 otherwise; a device
        answering after the deadline, before the round closed, is recorded as late."""
        with self._cond:
            current = self._given(name, task)
            if name in current.answers:
                raise _Refusal(409, f"{name} has already answered round {current.number} "
                                    f"({current.answers[name].split(':')[0]})")
            if time.monotonic() >= current.deadline:
                current.answers[name] = "late"
                self._cond.notify_all()
                raise _Refusal(409, f"round {current.number}'s deadline has passed")
            return current

    def _answer(self, name: str, task: str, outcome: str,
                accepted: _Accepted | None = None) -> None:
        with self._cond:
            current = self._open_for_answer(name, task)
            current.answers[name] = outcome
            if accepted is not None:
                current.accepted[name] = accepted
            self._cond.notify_all()
        log.debug("round %d: %s %s", current.number, name, outcome)

    def _result(self, name: str, task: str, body: bytes) -> None:
        """Screen ``body``; record it as accepted, or as rejected and refuse it."""
        current = self._open_for_answer(name, task)
        try:
            accepted = _screen(body, current)
        except _Refusal as refusal:
            self._answer(name, task, f"rejected: {refusal.reason}")
            raise
        self._answer(name, task, "accepted", accepted)


def device_seed(seed: int, name: str) -> int:
    """A device's own seed for a round: from the round's seed and the device's name, so
    devices shuffle differently; 31 bits, which every device language holds as an int."""
    state = np.random.SeedSequence([seed % 2**64, zlib.crc32(name.encode())]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def _prepare_round(number: int, manifest: dict, programs: Mapping[str, bytes],
                   arrays: Mapping[str, np.ndarray], training: Mapping[str, object]) -> dict:
    """The parts of a round's task that are the same for every device, checked."""
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise FedgeError(f"a round number is a non-negative integer, got {number!r}")
    try:
        entries = [(str(entry["name"]), tuple(int(n) for n in entry["shape"]),
                    bool(entry.get("frozen", False))) for entry in manifest["state"]]
        listed = {str(key): str(entry["sha256"]) for key, entry in manifest["programs"].items()}
        train_sha = listed["train"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FedgeError(f"round {number}: the manifest is not a fedge device manifest "
                         f"({type(error).__name__}: {error})") from None
    for key, sha in listed.items():
        program = programs.get(sha)
        if program is None:
            raise FedgeError(f"round {number}: no bytes for the {key} program {sha}")
        if hashlib.sha256(program).hexdigest() != sha:
            raise FedgeError(f"round {number}: the {key} program's bytes do not have the "
                             f"SHA-256 its manifest names ({sha})")
    names = [name for name, _, _ in entries]
    if set(arrays) != set(names):
        raise FedgeError(f"round {number}: the arrays are not the manifest's state entries "
                         f"(missing {sorted(set(names) - set(arrays))}, unexpected "
                         f"{sorted(set(arrays) - set(names))})")
    weights = {}
    for name, shape, _ in entries:
        weights[name] = np.asarray(arrays[name], dtype=np.float32)
        if weights[name].shape != shape:
            raise FedgeError(f"round {number}: array {name!r} has shape "
                             f"{list(weights[name].shape)}, the manifest's {list(shape)}")
    if not isinstance(training, Mapping):
        raise FedgeError(f"round {number}: the training settings are not a mapping")
    seed = training.get("seed", number)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FedgeError(f"round {number}: the training seed {seed!r} is not an integer")
    try:
        manifest = json.loads(json.dumps(manifest, allow_nan=False))
        training = json.loads(json.dumps(dict(training), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise FedgeError(f"round {number}: the manifest or training settings are not "
                         f"JSON ({error})") from None
    return {"programs": {sha: bytes(programs[sha]) for sha in listed.values()},
            "number": number, "manifest": manifest, "training": training, "seed": seed,
            "train_sha": train_sha,
            "weights": pack({"round": number}, weights),
            "trained": {name: shape for name, shape, frozen in entries if not frozen}}


def _screen(body: bytes, current: _Round) -> _Accepted:
    """A result that may be aggregated, or the refusal (400 or 422) saying why not."""
    try:
        header, arrays = unpack(body, "the result")
    except FedgeError as error:
        raise _Refusal(400, f"malformed result: {_one_line(str(error), 300)}") from None
    program = header.get("program")
    if program != current.train_sha:
        raise _Refusal(400, f"program hash mismatch: the result is for program "
                            f"{_one_line(program, 70)}, round {current.number} trains with "
                            f"{current.train_sha}")
    examples = header.get("num_examples")
    if (not isinstance(examples, int) or isinstance(examples, bool)
            or not 0 < examples <= MAX_EXAMPLES):
        raise _Refusal(422, f"num_examples is {_one_line(examples, 40)}, not a positive "
                            "integer")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict):
        raise _Refusal(422, "metrics is not a JSON object")
    for name in current.trained:
        if name not in arrays:
            raise _Refusal(422, f"array {name!r} is missing")
    for name in arrays:
        if name not in current.trained:
            raise _Refusal(422, f"array {_one_line(name, 80)!r} is not a trained state entry "
                                "of the model (unknown or frozen)")
    for name, shape in current.trained.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise _Refusal(422, f"array {name!r} is {array.dtype}, not float32")
        if array.shape != shape:
            raise _Refusal(422, f"array {name!r} has shape {list(array.shape)}, the task's "
                                f"is {list(shape)}")
        if np.isnan(array).any():
            raise _Refusal(422, f"array {name!r} holds NaN")
        if not np.isfinite(array).all():
            raise _Refusal(422, f"array {name!r} holds Inf")
    # A metric that is not a finite number does not count (as the server averages them).
    kept = {str(key): float(value) for key, value in metrics.items() if _finite_number(value)}
    return _Accepted(examples, arrays, kept)


def _aggregate(accepted: dict[str, _Accepted], trained: dict[str, tuple[int, ...]],
               report: dict[str, str]) -> RoundResult:
    """sum(n_k · w_k) / sum(n_k) per array, accumulated in float64, as float32."""
    total = sum(result.num_examples for result in accepted.values())
    arrays = {}
    for name, shape in trained.items():
        accumulated = np.zeros(shape, dtype=np.float64)
        for result in accepted.values():
            accumulated += float(result.num_examples) * result.arrays[name].astype(np.float64)
        arrays[name] = (accumulated / total).astype(np.float32)
    metrics: dict[str, float] = {}
    for key in dict.fromkeys(key for result in accepted.values() for key in result.metrics):
        reports = [(result.metrics[key], result.num_examples) for result in accepted.values()
                   if key in result.metrics]
        if key == "train_seconds":  # the devices train at once: the round took the longest
            metrics[key] = max(value for value, _ in reports)
        else:
            metrics[key] = (sum(value * n for value, n in reports)
                            / sum(n for _, n in reports))
    metrics[DEVICES_KEY] = float(len(accepted))
    return RoundResult(arrays=arrays, num_examples=total, metrics=metrics, report=report)


# -- HTTP ---------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    """Threads per connection, TLS handshakes in those threads, and a way to cut every
    connection so that closing the server never waits on a device."""

    daemon_threads = False
    block_on_close = True  # server_close() joins every connection's thread
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], fleet: DeviceFleet,
                 context: ssl.SSLContext | None, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.fleet = fleet
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._cut = False
        super().__init__(address, _Handler)
        if context is not None:
            # Handshakes happen in each connection's thread, not in the accepting loop.
            self.socket = context.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host up in DNS (getfqdn), which may hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        with self._connections_lock:
            if self._cut:
                return
            self._connections.add(request)
        try:
            request.settimeout(IDLE_SECONDS)
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            self.RequestHandlerClass(request, client_address, self)
        except OSError as error:  # a device that went away, a failed handshake, a timeout
            log.debug("connection from %s ended: %s", client_address, error)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def cut_connections(self) -> None:
        """Shut every open connection down, waking the threads that read from them."""
        with self._connections_lock:
            self._cut = True
            connections = list(self._connections)
        for connection in connections:
            with suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)  # below TLS


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fedge-gateway/1"
    timeout = IDLE_SECONDS
    disable_nagle_algorithm = True  # headers and body are two writes: send both at once
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, a method it lacks), as JSON."""
        self.log_error("code %d, message %s", code, message)
        self._send(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        fleet = self.server.fleet
        try:
            name = fleet._authenticate(self.headers.get("Authorization"))
            if name is None:
                raise _Refusal(401, "missing or unknown token: send 'Authorization: Bearer "
                                    "<token>' with this device's token")
            fleet._seen(name)
            status, payload = self._route(fleet, name, method, self._url())
        except _Refusal as refusal:
            close = refusal.close or (method == "POST" and not self._drained())
            self._send(refusal.status, {"error": refusal.reason}, close=close)
            return
        self._send(status, payload)

    def _route(self, fleet: DeviceFleet, name: str, method: str, url: SplitResult
               ) -> tuple[int, object]:
        path = url.path
        task_path, program_path = TASK_PATH.fullmatch(path), PROGRAM_PATH.fullmatch(path)
        if path == "/v1/hello":
            self._need(method, "POST")
            return 200, fleet._hello(name, self._read_json())
        if path == "/v1/task":
            self._need(method, "GET")
            return fleet._next_task(name, self._wait_seconds(url.query, fleet))
        if program_path:
            self._need(method, "GET")
            return 200, fleet._program(program_path[1])
        if task_path:
            task, what = task_path[1], task_path[2]
            if what == "weights":
                self._need(method, "GET")
                return 200, fleet._weights(name, task)
            self._need(method, "POST")
            fleet._open_for_answer(name, task)
            try:
                body = self._failure() if what == "failure" else self._read_body(
                    MAX_RESULT_BYTES)
            except _Refusal as refusal:  # an answer all the same: the round need not wait
                fleet._answer(name, task, f"rejected: {refusal.reason}")
                raise
            if isinstance(body, str):
                fleet._answer(name, task, f"failed: {body}")
                return 200, {"recorded": True}
            fleet._result(name, task, body)
            return 200, {"accepted": True}
        raise _Refusal(404, f"no such path: {_one_line(path, 80)}")

    def _url(self) -> SplitResult:
        try:
            return urlsplit(self.path)
        except ValueError:  # "http://[::1/v1/task": a bracket that does not close
            raise _Refusal(400, f"{_one_line(self.path, 80)} is not a URL") from None

    @staticmethod
    def _need(method: str, expected: str) -> None:
        if method != expected:
            raise _Refusal(405, f"use {expected} for this path")

    @staticmethod
    def _wait_seconds(query: str, fleet: DeviceFleet) -> float:
        values = parse_qs(query).get("wait", ["0"])
        try:
            wait = float(values[-1])
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            raise _Refusal(400, "wait must be a non-negative number of seconds")
        return min(wait, fleet.settings.poll_seconds)

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _Refusal(411, "send the body with a Content-Length, not chunked", close=True)
        text = self.headers.get("Content-Length")
        if text is None:
            raise _Refusal(411, "the body needs a Content-Length", close=True)
        length = _size(text)
        if length is None:
            raise _Refusal(400, f"Content-Length {_one_line(text, 30)} is not a size",
                           close=True)
        if length > limit:
            raise _Refusal(413, f"the body is {length} bytes, over the limit of {limit}",
                           close=True)
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            raise _Refusal(400, f"the body ended after {len(data)} of {length} bytes",
                           close=True)
        return data

    def _drained(self) -> bool:
        """Whether the body of a refused request is read (a small unread one is read and
        dropped, so the device gets its answer rather than a reset connection)."""
        if self._body_read:
            return True
        length = _size(self.headers.get("Content-Length") or "")
        if length is None or length > MAX_JSON_BYTES or self.headers.get("Transfer-Encoding"):
            return False
        return len(self.rfile.read(length)) == length

    def _read_json(self) -> object:
        data = self._read_body(MAX_JSON_BYTES)
        try:
            return read_json(data, "the body")
        except FedgeError as error:
            raise _Refusal(400, _one_line(str(error), 300)) from None

    def _failure(self) -> str:
        """Why the device cannot train, from a failure's body."""
        body = self._read_json()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, str):
            raise _Refusal(400, 'a failure needs "error": why this device cannot train')
        return _one_line(error, 300)

    def _send(self, status: int, payload: object, close: bool = False) -> None:
        if isinstance(payload, bytes):
            body, content_type = payload, BLOB_TYPE
        elif payload is None:
            body, content_type = b"", None
        else:
            body, content_type = json.dumps(payload, allow_nan=False).encode(), JSON_TYPE
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)
