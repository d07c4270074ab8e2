"""The edge gateway's rounds: devices without Python train over HTTPS.

Toward the federation the gateway is one Flower client node (its adapter calls
:meth:`DeviceFleet.run_round` once per round); toward devices it serves the protocol in
``client/device/PROTOCOL.md`` through its HTTP API (``fedge.server.gateway_http``). Each
round's task goes to every device that asks for it; the round waits until every device that
took it, or is polling, has answered (a result or a failure) or its deadline passes, then
averages the accepted results weighted by their examples. A result is screened before it
counts, as the server screens its clients: it must be for the round's train program, carry
exactly the trained (not frozen) state entries with the task's shapes as finite float32, and
a positive integer ``num_examples``.

Devices authenticate with bearer tokens (``fedge.server.device_tokens``); the gateway keeps
only their SHA-256 digests. numpy; every wait is bounded, and no thread outlives
:meth:`DeviceFleet.serving`.
"""

import hashlib
import hmac
import json
import logging
import math
import secrets
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedge.errors import FedgeError
from fedge.files import finite_number
from fedge.models.blob import pack, unpack
from fedge.protocol import DEVICES_KEY
from fedge.server.device_tokens import HEX_DIGEST, check_device_name
from fedge.server.gateway_http import DeviceHTTPServer, Refusal, one_line

log = logging.getLogger("fedge.gateway")

# A device that made a request this recently counts as present: a round ends early only
# once every present device (and every one that took the task) has answered.
PRESENCE_SECONDS = 5.0
PRESENCE_CHECK = 0.25  # how often a waiting round looks whether presence has lapsed
MAX_EXAMPLES = 2**53  # num_examples beyond it would not be exact as a float64 weight
# A device's answer to a round, as the gateway's metrics count them ("missing": it took
# the task and never answered).
RESULT_OUTCOMES = ("accepted", "rejected", "failed", "late", "missing")


@dataclass(frozen=True)
class GatewaySettings:
    round_deadline: float = 60.0  # seconds a round waits for device results
    min_devices: int = 1  # results a round needs, else it fails
    poll_seconds: float = 20.0  # the longest a GET /v1/task long-poll waits

    def __post_init__(self) -> None:
        for name in ("round_deadline", "poll_seconds"):
            value = getattr(self, name)
            if not finite_number(value) or value <= 0:
                raise FedgeError(f"gateway {name} must be a positive number of seconds, "
                                 f"got {value!r}")
        if (not isinstance(self.min_devices, int) or isinstance(self.min_devices, bool)
                or self.min_devices < 1):
            raise FedgeError(f"gateway min_devices must be a positive integer, got "
                             f"{self.min_devices!r}")


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


class DeviceFleet:
    """The devices behind one gateway: serves them the protocol and runs their rounds."""

    def __init__(self, tokens: Mapping[str, str],
                 settings: GatewaySettings = GatewaySettings()) -> None:
        if not tokens:
            raise FedgeError("the gateway knows no devices: give it their token digests")
        digests: dict[str, str] = {}
        for name, digest in tokens.items():
            check_device_name(name)
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
        # What the gateway's operator metrics count (fedge.server.operator_metrics).
        self._counted = {"round": 0, "rounds": {"completed": 0, "failed": 0},
                         "results": dict.fromkeys(RESULT_OUTCOMES, 0), "received_bytes": 0}

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
            server = DeviceHTTPServer((host, port), self, context, family)
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
            self._count_round(server_round, report, len(accepted) >= self.settings.min_devices)
        counts, outcomes = self._summary(report, accepted, said_hello)
        others = [outcome for outcome in outcomes if not outcome.endswith(" accepted")]
        log.info("round %d: %s%s", server_round, counts, "".join(f"; {o}" for o in others))
        if len(accepted) < self.settings.min_devices:
            raise FedgeError(f"round {server_round} failed: {counts}, fewer than the "
                             f"{self.settings.min_devices} it needs (min_devices); "
                             + "; ".join(outcomes))
        return _aggregate(accepted, current.trained, report)

    def metrics(self) -> dict:
        """What the gateway's operator metrics show: its devices (known, seen: said
        hello, present now), the last round, rounds and device results by outcome, and
        the bytes of results received."""
        now = time.monotonic()
        with self._cond:
            devices = self._devices.values()
            return {"known": len(self._devices), "seen": sum(d.hello for d in devices),
                    "present": sum(bool(d.polling or now - d.last_seen <= PRESENCE_SECONDS)
                                   for d in devices),
                    "round": self._counted["round"],
                    "rounds": dict(self._counted["rounds"]),
                    "results": dict(self._counted["results"]),
                    "received_bytes": self._counted["received_bytes"]}

    def _count_round(self, server_round: int, report: dict[str, str], completed: bool
                     ) -> None:
        """Count a closed round and its devices' outcomes (hold the lock)."""
        self._counted["round"] = server_round
        self._counted["rounds"]["completed" if completed else "failed"] += 1
        for outcome in report.values():
            kind = outcome.split(":")[0]
            self._counted["results"][kind if kind in RESULT_OUTCOMES else "missing"] += 1

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
            raise Refusal(400, 'hello needs "samples": the number of the device\'s local '
                               "samples")
        with self._cond:
            device = self._devices[name]
            first, device.hello, device.samples = not device.hello, True, samples
        if first:
            described = ", ".join(one_line(body.get(key), 60) for key in ("runtime", "client")
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
            raise Refusal(404, f"no program {one_line(sha256, 80)}")
        return program

    def _given(self, name: str, task: str) -> _Round:
        """The round of ``task`` if it is open and ``name`` took it (hold the lock)."""
        current = self._round
        if current is None or current.task != task:
            if task in self._past:
                raise Refusal(409, f"round {self._past[task]} is over: its results were "
                                   "aggregated")
            raise Refusal(404, f"no task {one_line(task, 40)}")
        if current.closed:
            raise Refusal(409, f"round {current.number} is over: its results were aggregated")
        if name not in current.taken:
            raise Refusal(404, f"task {task} was not given to {name}")
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
                raise Refusal(409, f"{name} has already answered round {current.number} "
                                   f"({current.answers[name].split(':')[0]})")
            if time.monotonic() >= current.deadline:
                current.answers[name] = "late"
                self._cond.notify_all()
                raise Refusal(409, f"round {current.number}'s deadline has passed")
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
        with self._cond:
            self._counted["received_bytes"] += len(body)
        current = self._open_for_answer(name, task)
        try:
            accepted = _screen(body, current)
        except Refusal as refusal:
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
        raise Refusal(400, f"malformed result: {one_line(str(error), 300)}") from None
    program = header.get("program")
    if program != current.train_sha:
        raise Refusal(400, f"program hash mismatch: the result is for program "
                           f"{one_line(program, 70)}, round {current.number} trains with "
                           f"{current.train_sha}")
    examples = header.get("num_examples")
    if (not isinstance(examples, int) or isinstance(examples, bool)
            or not 0 < examples <= MAX_EXAMPLES):
        raise Refusal(422, f"num_examples is {one_line(examples, 40)}, not a positive "
                           "integer")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict):
        raise Refusal(422, "metrics is not a JSON object")
    for name in current.trained:
        if name not in arrays:
            raise Refusal(422, f"array {name!r} is missing")
    for name in arrays:
        if name not in current.trained:
            raise Refusal(422, f"array {one_line(name, 80)!r} is not a trained state entry "
                               "of the model (unknown or frozen)")
    for name, shape in current.trained.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise Refusal(422, f"array {name!r} is {array.dtype}, not float32")
        if array.shape != shape:
            raise Refusal(422, f"array {name!r} has shape {list(array.shape)}, the task's "
                               f"is {list(shape)}")
        if np.isnan(array).any():
            raise Refusal(422, f"array {name!r} holds NaN")
        if not np.isfinite(array).all():
            raise Refusal(422, f"array {name!r} holds Inf")
    # A metric that is not a finite number does not count (as the server averages them).
    kept = {str(key): float(value) for key, value in metrics.items() if finite_number(value)}
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
