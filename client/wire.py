"""The wire privacy check: record every reply a ClientApp sends, then audit the recording.

:class:`WireRecorder` is a Flower client mod. As the outermost mod (the first in a
ClientApp's ``mods``) it sees each reply after every other mod has shaped it, i.e.
exactly what leaves the client, and writes it to a folder before handing it on: one
``.npz`` of the reply's arrays and one ``.json`` of everything else per message, named
``node-<node id>_round-<round>_<message type>_<message id>``. The JSON is written last,
so a message whose JSON exists was recorded in full. When a recording cannot be
written the reply is not sent either: a recording never silently misses a message.

:func:`audit_recording` checks a recording against the client's raw samples; see its
docstring for what the check can and cannot show. This module imports Flower and numpy
but not torch: the relay ClientApp, started afresh for every message, uses the recorder.
"""

import base64
import io
import json
import math
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedge.errors import FedgeError
from fedge.files import write_atomic, write_json
from fedge.models.exchange import read_manifest
from fedge.protocol import MODEL_SPEC, PROGRAM_KEY, SERVER_ROUND

FORMAT = "fedge-wire/1"
FOLDER_KEY = "record-wire"  # node-config entry naming the folder (deployment)
NUMPY_STYPE = "numpy.ndarray"  # Flower's serialisation type for numpy-backed arrays
MIN_SAMPLE_VALUES = 4  # shorter rows could occur in weights by coincidence
RECORD_TYPES = ("arrays", "metrics", "config")  # what a recording describes
ENTRIES_KEY = "model-entries"  # recorded with your own model: its entries' shapes (JSON)


def check_wire_folder(folder: Path) -> Path:
    """The recording folder as an absolute path (simulation workers and the relay run
    elsewhere), or a clear error if it cannot be one."""
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise FedgeError(f"--record-wire {folder} is a file, not a folder")
    try:  # a recording that cannot be written would fail every round
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedge-write-check-"):
            pass
    except OSError as error:
        raise FedgeError(f"--record-wire {folder} cannot be written: "
                         f"{error.strerror or error}") from None
    return folder


@dataclass(frozen=True)
class WireRecorder:
    """A Flower mod that records every reply into ``folder``; without one, into the
    folder the node config names under ``record-wire``, and records nothing when the
    node config names none. Put it first in ``mods``: it must be the outermost."""

    folder: Path | None = None

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        folder = self.folder or context.node_config.get(FOLDER_KEY)
        if not folder:
            return call_next(msg, context)
        try:
            reply = call_next(msg, context)
        except Exception as error:  # Flower's runtime turns it into an error reply
            record_reply(Path(str(folder)), msg, context, None, f"{type(error).__name__}: {error}")
            raise
        record_reply(Path(str(folder)), msg, context, reply)
        return reply


def record_reply(folder: Path, instruction: Message, context: Context, reply: Message | None,
                 raised: str | None = None) -> Path:
    """Write ``reply`` to ``instruction`` (or the exception text ``raised`` instead of a
    reply) into ``folder``; returns the JSON file, written last."""
    folder.mkdir(parents=True, exist_ok=True)
    received = _received_config(instruction)
    server_round = _round_of(instruction, received)
    stem = _message_name(context.node_id, server_round, instruction)
    arrays: dict[str, np.ndarray] = {}
    sent, error = None, None
    if reply is not None and reply.has_error():
        error = {"code": reply.error.code, "reason": reply.error.reason}
    elif reply is not None:
        sent = {name: _describe_record(name, record, arrays)
                for name, record in reply.content.items()}
    else:
        error = {"code": None, "reason": raised, "raised": True}
    if arrays:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        write_atomic(folder / f"{stem}.npz", buffer.getvalue())
    path = folder / f"{stem}.json"
    write_json(path, {
        "format": FORMAT, "node_id": context.node_id,
        "partition_id": context.node_config.get("partition-id"),
        "round": server_round,
        "message_type": instruction.metadata.message_type,
        "instruction_id": instruction.metadata.message_id,
        "received": received, "sent": sent, "error": error,
    })
    return path


def _received_config(instruction: Message) -> dict[str, Any]:
    """The instruction's scalar config entries (model spec, round, ...), not its arrays:
    the audit needs the model spec, and a reader the round."""
    if not instruction.has_content():
        return {}
    received = {key: value for record in instruction.content.config_records.values()
                for key, value in record.items() if isinstance(value, str | int | float | bool)}
    program = next((record[PROGRAM_KEY] for record in instruction.content.config_records.values()
                    if isinstance(record.get(PROGRAM_KEY), bytes)), None)
    if program is not None:  # your own model: its entries' shapes, for the audit
        received[ENTRIES_KEY] = json.dumps({name: list(entry.shape) for name, entry
                                            in read_manifest(program).items()})
    return received


def _round_of(instruction: Message, received: dict[str, Any]) -> int | None:
    """The server round: Flower's strategies send it in the config, its workflows (e.g.
    SecAgg+'s key exchange) as the message's group id."""
    server_round = received.get(SERVER_ROUND)
    if isinstance(server_round, int):
        return server_round
    group = instruction.metadata.group_id
    return int(group) if group.isdigit() else None


def _message_name(node_id: int, server_round: int | None, instruction: Message) -> str:
    round_part = "none" if server_round is None else f"{server_round:04d}"
    message_id = instruction.metadata.message_id or uuid.uuid4().hex
    return (f"node-{node_id}_round-{round_part}_"
            f"{instruction.metadata.message_type}_{message_id[:12]}")


def _describe_record(name: str, record: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One record of the reply as JSON; its arrays go into ``arrays`` (the NPZ)."""
    if isinstance(record, ArrayRecord):
        entries = []
        for key, array in record.items():
            npz_name = f"a{len(arrays)}"
            arrays[npz_name] = (array.numpy() if array.stype == NUMPY_STYPE
                                else np.frombuffer(array.data, dtype=np.uint8))
            entries.append({"key": key, "npz": npz_name, "dtype": array.dtype,
                            "shape": list(array.shape), "stype": array.stype})
        return {"type": "arrays", "entries": entries}
    if isinstance(record, MetricRecord):
        return {"type": "metrics", "entries": dict(record)}
    if isinstance(record, ConfigRecord):
        return {"type": "config", "entries": {k: _to_json(v) for k, v in record.items()}}
    raise TypeError(f"record {name!r} of a reply has unknown type {type(record).__name__}")


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["base64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# --- reading a recording ------------------------------------------------------------


@dataclass(frozen=True)
class SentMessage:
    """One recorded reply: what the client sent, and the config it had received."""

    name: str
    node_id: int
    round: int | None
    received: dict[str, Any]
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # record → key → array
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None


def read_recording(folder: Path) -> list[SentMessage]:
    """Every message recorded in ``folder``, by name; a clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FedgeError(f"no wire recording at {folder}: not a folder")
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    if not files:
        raise FedgeError(f"{folder} holds no recorded messages (*.json); record some with "
                         "`fedge simulate --record-wire` or `fedge client --record-wire`")
    return [_read_message(path) for path in files]


def _read_message(path: Path) -> SentMessage:
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} message")
        if (payload["sent"] is None) == (payload["error"] is None):
            raise ValueError("it must hold either what was sent or an error, not both or "
                             "neither")
        sent = payload["sent"] or {}
        unknown = {r["type"] for r in sent.values()} - set(RECORD_TYPES)
        if unknown:
            raise ValueError(f"unknown record type {sorted(unknown)[0]!r}")
        arrays = _read_arrays(path.with_suffix(".npz"), sent)
        return SentMessage(
            name=path.stem, node_id=int(payload["node_id"]), round=payload["round"],
            received=dict(payload["received"]), error=payload["error"],
            arrays={name: arrays[name] for name, r in sent.items() if r["type"] == "arrays"},
            metrics={name: dict(r["entries"]) for name, r in sent.items()
                     if r["type"] == "metrics"},
            configs={name: {k: _from_json(v) for k, v in r["entries"].items()}
                     for name, r in sent.items() if r["type"] == "config"},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile) as error:
        raise FedgeError(f"cannot read recorded message {path}: {error}") from error


def _read_arrays(path: Path, sent: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    described = {name: r["entries"] for name, r in sent.items() if r["type"] == "arrays"}
    if not any(described.values()):
        return {name: {} for name in described}
    with np.load(path, allow_pickle=False) as npz:
        return {name: {e["key"]: npz[e["npz"]] for e in entries}
                for name, entries in described.items()}


# --- the audit -----------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    message: str
    problem: str


@dataclass(frozen=True)
class WireAudit:
    """What a recording holds and what in it breaks the privacy check."""

    messages: int
    nodes: int
    rounds: int
    arrays: int
    metrics: int
    error_replies: int
    samples_searched: int
    samples_skipped: int
    violations: list[Violation]

    @property
    def passed(self) -> bool:
        return not self.violations


def audit_recording(folder: Path, samples: np.ndarray) -> WireAudit:
    """Check that the clients recorded in ``folder`` sent only the model's parameters and
    scalar metrics, and none of ``samples`` (the clients' raw samples, one per row).

    Three checks, per recorded message:

    1. every array sent is named like one of the model's parameters and has its shape
       (the model comes from the ``model-spec`` the client received);
    2. every metric is a scalar, not a list;
    3. no sample occurs verbatim in anything sent. A sample row :math:`x_i` with
       :math:`d` values is encoded as the bytes of :math:`x_i` in its own dtype, in
       float32 and in float64, and each encoding is searched for at every byte offset of
       every array's raw bytes, of each bytes or number-list config value, and of the
       message's metric values packed in order (a sample sent as :math:`d` scalar
       metrics is found too).

    The byte search finds a copied sample wherever it is hidden, including inside an
    array of the right name and shape, which check 1 cannot see; ``tests/test_wire.py``
    shows each check failing on a leaky client. A whole-row match of :math:`4d \\ge 16`
    bytes does not happen by chance, but a row of fewer than ``MIN_SAMPLE_VALUES``
    values, or of one repeated value (e.g. all zeros, like a fresh bias), could occur in
    weights without any leak: such rows are skipped and counted, and an audit that
    could search no sample at all is refused rather than passed.

    What it cannot show: samples sent transformed (scaled, compressed, encrypted, as
    text, or only in part), labels (too short to identify), or what the trained weights
    themselves reveal about the samples (membership or reconstruction attacks; that is
    what differential privacy bounds). It proves the absence of verbatim copies only.
    """
    messages = read_recording(folder)
    fingerprints, skipped = _sample_fingerprints(np.asarray(samples))
    if not fingerprints:
        raise FedgeError(f"none of the {len(samples)} samples can be searched for: each needs "
                         f"at least {MIN_SAMPLE_VALUES} values, not all equal")
    violations: list[Violation] = []
    for message in messages:
        violations += _structure_violations(message, np.asarray(samples))
        violations += _sample_violations(message, fingerprints)
    return WireAudit(
        messages=len(messages), nodes=len({m.node_id for m in messages}),
        rounds=len({m.round for m in messages}),
        arrays=sum(len(r) for m in messages for r in m.arrays.values()),
        metrics=sum(len(r) for m in messages for r in m.metrics.values()),
        error_replies=sum(m.error is not None for m in messages),
        samples_searched=len(fingerprints), samples_skipped=skipped, violations=violations,
    )


def _sample_fingerprints(samples: np.ndarray) -> tuple[list[tuple[int, dict[str, bytes]]], int]:
    if samples.ndim == 0 or len(samples) == 0:
        raise FedgeError("no samples to search for: the data holds none")
    if samples.dtype.kind not in "iufb":
        raise FedgeError(f"samples must be numeric, not {samples.dtype}")
    rows = samples.reshape(len(samples), -1)
    fingerprints = []
    for index, row in enumerate(rows):
        if row.size < MIN_SAMPLE_VALUES or np.all(row == row[0]):
            continue
        encodings = {str(row.dtype): row.tobytes(),
                     "float32": row.astype(np.float32).tobytes(),
                     "float64": row.astype(np.float64).tobytes()}
        fingerprints.append((index, encodings))
    return fingerprints, len(rows) - len(fingerprints)


def _structure_violations(message: SentMessage, samples: np.ndarray) -> Iterator[Violation]:
    if any(message.arrays.values()):
        shapes = _model_shapes(_model_spec_of(message), tuple(samples.shape[1:]),
                               message.received.get(ENTRIES_KEY))
        for record, arrays in message.arrays.items():
            for key, array in arrays.items():
                if key not in shapes:
                    yield Violation(message.name, f"array {record}/{key!r} is not one of the "
                                                  "model's parameters")
                elif array.shape != shapes[key]:
                    yield Violation(message.name, f"array {record}/{key!r} has shape "
                                                  f"{array.shape}, the model's {shapes[key]}")
    for record, metrics in message.metrics.items():
        for key, value in metrics.items():
            if isinstance(value, list):
                yield Violation(message.name, f"metric {record}/{key!r} is a list of "
                                              f"{len(value)} values, not a scalar")


def _model_spec_of(message: SentMessage) -> str:
    spec = message.received.get(MODEL_SPEC)
    if not isinstance(spec, str):
        raise FedgeError(f"recorded message {message.name} sent arrays, but the instruction "
                         "it answered carried no model-spec to check them against")
    return spec


@cache
def _model_shapes(spec_json: str, sample_shape: tuple[int, ...],
                  entries_json: str | None = None) -> dict[str, tuple[int, ...]]:
    """The model's parameter names and shapes: your own model's as its program listed
    them, a built-in one's from building it (torch is imported only here)."""
    from fedge.models.registry import ModelSpec, build_model

    spec = ModelSpec.from_json(spec_json)
    if math.prod(sample_shape) != math.prod(spec.input_shape):
        raise FedgeError(f"the samples have shape {sample_shape}, but the recorded model "
                         f"{spec.name!r} takes {spec.input_shape}: are these the clients' data?")
    if entries_json is not None:
        return {key: tuple(shape) for key, shape in json.loads(entries_json).items()}
    return {key: tuple(value.shape) for key, value in build_model(spec).state_dict().items()}


def _sample_violations(message: SentMessage, fingerprints: list[tuple[int, dict[str, bytes]]]
                       ) -> Iterator[Violation]:
    """At most one violation per place searched: the first encoding found there."""
    encodings = sorted({name for _, encoded in fingerprints for name in encoded})
    for location, blobs in _sent_bytes(message).items():
        for encoding in encodings:
            found = [index for index, encoded in fingerprints if encoding in encoded
                     and any(encoded[encoding] in blob for blob in blobs)]
            if found:
                yield Violation(message.name, f"{location} holds {len(found)} raw sample(s) "
                                              f"verbatim as {encoding} (e.g. sample {found[0]})")
                break


def _sent_bytes(message: SentMessage) -> dict[str, list[bytes]]:
    """Every number and byte string the message sent, as raw bytes to search, by place."""
    places: dict[str, list[bytes]] = {}
    for record, arrays in message.arrays.items():
        for key, array in arrays.items():
            places[f"array {record}/{key!r}"] = [array.tobytes(order="A")]
    for record, metrics in message.metrics.items():
        places[f"metrics {record!r}"] = _packed(_flat(metrics.values()))
    for record, configs in message.configs.items():
        for key, value in configs.items():
            items = list(_flat([value]))
            places[f"config {record}/{key!r}"] = [
                *(v for v in items if isinstance(v, bytes)), *_packed(items)]
    return places


def _flat(values: Iterable[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, list):
            yield from _flat(value)
        else:
            yield value


def _packed(values: Iterable[Any]) -> list[bytes]:
    """Numbers sent one by one, packed in order as float32, float64 (and int64 if all
    are integers), the forms a sample row's bytes take."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return []
    dtypes = [np.float32, np.float64] + ([np.int64] if all(isinstance(v, int) for v in numbers)
                                         else [])
    return [np.asarray(numbers, dtype=dtype).tobytes() for dtype in dtypes]
