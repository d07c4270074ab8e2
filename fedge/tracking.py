"""Where a run's numbers go besides its run folder: an MLflow tracking server or store, and
TensorBoard's event files (``--track mlflow[:URI]``, ``--track tensorboard[:DIR]``).

A tracker is written to from a thread of its own, so that a slow or unreachable one never
holds up training: what it cannot take yet waits in order and is retried, with one warning
when it first fails and one line when it catches up. When the run ends, the tracker gets
``flush_timeout`` seconds more; what it still has not taken is named in one warning (the
run folder holds all of it). The server's trackers are fed by
:mod:`fedge.server.tracking`, a device's own by :mod:`fedge.client.tracking`.
"""

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.errors import FedgeError
from fedge.files import finite_number

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("fedge.tracking")

EXPERIMENT = "fedge"  # the MLflow experiment fedge's runs go to, unless MLFLOW_EXPERIMENT_NAME
LOCAL_MLFLOW = "mlruns"  # the default local store's folder, beside the run folder
DEFAULT_FLUSH_TIMEOUT = 30.0
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)  # waits between attempts, the last one repeated
# MLflow's own HTTP retries would hold one request for minutes; fedge retries itself.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(frozen=True)
class Target:
    """One ``--track`` value: ``kind`` (mlflow, tensorboard) and ``where`` (None: the
    default place)."""

    kind: str
    where: str | None

    @classmethod
    def parse(cls, value: str) -> "Target":
        kind, colon, where = value.partition(":")
        if kind not in ("mlflow", "tensorboard") or (colon and not where):
            raise FedgeError(f"--track {value}: expected mlflow[:URI] or tensorboard[:DIR]")
        return cls(kind, where or None)

    def __str__(self) -> str:
        return self.kind if self.where is None else f"{self.kind}:{self.where}"


def _check_installed(targets: list[Target]) -> None:
    """A clear error, before anything starts, for a tracker whose library is missing."""
    needed = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
    for target in targets:
        try:
            __import__(needed[target.kind])
        except ImportError:
            raise FedgeError(f"--track {target} needs {needed[target.kind]}: pip install "
                             "'fedge[tracking]'") from None


def metric_name(name: str) -> str:
    """A name MLflow and TensorBoard both take: letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def name_part(key: object) -> str:
    """One part of a metric's name (a class, a client's key): no slash, and never ``.``
    or ``..``, which MLflow refuses as names that would resolve to other names."""
    part = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(key)).strip()
    return part if part not in ("", ".", "..") else "_"


def scalars(values: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` by name, nested tables one level deep as
    ``name/key`` (a per-class table): booleans, None, NaN and text are left out."""
    found: dict[str, float] = {}
    for key, value in values.items():
        name = metric_name(prefix) + name_part(key)
        if isinstance(value, Mapping):
            for inner, number in value.items():
                if finite_number(number):
                    found[f"{name}/{name_part(inner)}"] = float(number)
        elif finite_number(value):
            found[name] = float(value)
    return found


class Sink:
    """One tracker's writes; each may raise: it is retried, unless :meth:`refused` says
    the tracker will never take it."""

    name = "tracker"

    def refused(self, error: Exception) -> bool:
        """Whether ``error`` is the tracker refusing the write for good (no retry)."""
        return False

    def open(self, run_name: str, tags: dict[str, str], resume_id: str | None) -> str | None:
        """Start (or continue) the tracker's run; returns its id, if it has one."""
        return None

    def params(self, values: dict[str, str]) -> None: ...
    def metrics(self, values: dict[str, float], step: int) -> None: ...
    def artifacts(self, files: list[Path], onnx_model: Path | None) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowSink(Sink):
    """An MLflow run through ``MlflowClient``: a tracking server (``http://...``), a
    database (``sqlite:///...``), or by default a local store in ``folder`` (SQLite and
    an artifacts folder: MLflow no longer takes plain ``./mlruns`` folders)."""

    def __init__(self, uri: str | None, folder: Path) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        for chatty in ("mlflow.store.db.utils", "alembic"):  # a new store's set-up, at INFO
            logging.getLogger(chatty).setLevel(logging.WARNING)
        self.folder = None if uri else folder.resolve()
        self.uri = uri or f"sqlite:///{self.folder / 'mlflow.db'}"
        self.name = f"mlflow ({self.uri})"
        self.run_id: str | None = None

    def _client(self) -> "MlflowClient":
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def refused(self, error: Exception) -> bool:
        from mlflow.exceptions import MlflowException

        return (isinstance(error, MlflowException)
                and 400 <= error.get_http_status_code() < 500)

    def open(self, run_name: str, tags: dict[str, str], resume_id: str | None) -> str | None:
        from mlflow.exceptions import MlflowException

        client = self._client()
        if resume_id is not None:
            try:
                client.update_run(resume_id, status="RUNNING")
            except MlflowException as error:
                if not self.refused(error):
                    raise
                log.warning("%s no longer has run %s: the resumed run starts a new one",
                            self.name, resume_id)
            else:
                self.run_id = resume_id
                return resume_id
        experiment = self._experiment(client)
        self.run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
        return self.run_id

    def _experiment(self, client: "MlflowClient") -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            return client.create_experiment(name, artifact_location=str(
                self.folder / "artifacts"))
        return client.create_experiment(name)

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        client = self._client()
        # A resumed run may change a few settings (rounds, timeouts): MLflow keeps a
        # parameter's first value, so a changed one is kept as a tag.
        logged = client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for start in range(0, len(new), 100):  # MLflow's limit per batch
            client.log_batch(self.run_id, params=new[start:start + 100])
        for key, value in values.items():
            if key in logged and logged[key] != value:
                client.set_tag(self.run_id, f"resumed.{key}", value)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, v, stamp, step) for k, v in values.items()]
        client = self._client()
        for start in range(0, len(batch), 1000):
            client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def artifacts(self, files: list[Path], onnx_model: Path | None) -> None:
        client = self._client()
        for file in files:
            client.log_artifact(self.run_id, str(file))
        if onnx_model is not None:
            self._log_model(onnx_model)

    def _log_model(self, path: Path) -> None:
        """The ONNX model as an MLflow model of this run, which the registry can take
        (``mlflow.register_model(model_uri, NAME)``)."""
        import mlflow
        import mlflow.onnx
        import onnx

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.onnx.log_model(onnx.load(str(path)), name="model",
                                  pip_requirements=["onnxruntime"])

    def finish(self, status: str) -> None:
        self._client().set_terminated(self.run_id, status=status)


class TensorBoardSink(Sink):
    """Event files in ``folder`` (torch's ``SummaryWriter``); a resumed run discards the
    steps after its checkpoint and goes on in the same folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = f"tensorboard ({folder})"
        self.writer = None

    def open(self, run_name: str, tags: dict[str, str], resume_id: str | None) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        purge = int(resume_id) + 1 if resume_id is not None else None
        self.writer = SummaryWriter(str(self.folder), purge_step=purge)
        self.writer.add_text("run", "  \n".join(f"{k}: {v}" for k, v in tags.items()), 0)
        return None

    def params(self, values: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.writer.add_text("config", f"| setting | value |\n|---|---|\n{table}", 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


@dataclass(frozen=True)
class _Write:
    what: str  # as a warning names it: "round 3", "the artifacts"
    call: Callable[[], None]


class Tracker:
    """A :class:`Sink` written from a thread of its own, in order, retrying what fails."""

    def __init__(self, sink: Sink, flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
                 on_opened: Callable[[str | None], None] | None = None) -> None:
        self.sink, self.flush_timeout, self.on_opened = sink, flush_timeout, on_opened
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._pending: list[_Write] = []  # taken from the queue, not yet written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._work, name=f"fedge-{sink.name}",
                                        daemon=True)
        self._thread.start()

    def open(self, run_name: str, tags: dict[str, str], resume_id: str | None = None) -> None:
        def opened() -> None:
            found = self.sink.open(run_name, tags, resume_id)
            if self.on_opened:
                self.on_opened(found)

        self.write("the run's start", opened)

    def params(self, values: dict[str, str]) -> None:
        self.write("the settings", lambda: self.sink.params(values))

    def metrics(self, values: dict[str, float], step: int, what: str) -> None:
        self.write(what, lambda: self.sink.metrics(values, step))

    def artifacts(self, files: list[Path], onnx_model: Path | None = None) -> None:
        self.write("the artifacts", lambda: self.sink.artifacts(files, onnx_model))

    def finish(self, status: str) -> None:
        self.write(f"the status {status}", lambda: self.sink.finish(status))

    def write(self, what: str, call: Callable[[], None]) -> None:
        """Have ``call`` write ``what`` (as a warning would name it) in its turn."""
        self._writes.put(_Write(what, call))

    def close(self) -> list[str]:
        """Wait up to ``flush_timeout`` s for everything to be written; returns (and
        warns of) what was not."""
        self._writes.put(None)
        self._thread.join(self.flush_timeout)
        self._stop.set()
        with self._lock:
            lost = [w.what for w in self._pending]
        while True:
            try:
                write = self._writes.get_nowait()
            except queue.Empty:
                break
            if write is not None:
                lost.append(write.what)
        if lost:
            log.warning("%s could not be reached within %.0f s of the run's end; it lacks "
                        "%s (the run folder has all of it)", self.sink.name,
                        self.flush_timeout, _listed(lost))
        return lost

    def _work(self) -> None:
        while True:
            write = self._writes.get()
            if write is None:
                return
            with self._lock:
                self._pending.append(write)
            if not self._write(write):
                return
            with self._lock:
                self._pending.remove(write)
            if self._stop.is_set():  # closed while this write went on: close() named the rest
                return

    def _write(self, write: _Write) -> bool:
        """Until it is written (True) or the tracker is closed (False)."""
        attempt = 0
        while not self._stop.is_set():
            try:
                write.call()
            except Exception as error:  # any failure of a tracker is retried
                if self.sink.refused(error):
                    log.warning("%s refused %s (%s); it is skipped", self.sink.name,
                                write.what, _first_line(error))
                    return True
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("%s failed on %s (%s: %s); training goes on, and fedge "
                                "retries", self.sink.name, write.what, type(error).__name__,
                                _first_line(error))
                wait = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                self._stop.wait(wait)
                continue
            if self._failing_since is not None:
                log.warning("%s is back after %.0f s; catching up from %s", self.sink.name,
                            time.monotonic() - self._failing_since, write.what)
                self._failing_since = None
            return True
        return False


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _listed(whats: list[str]) -> str:
    """What a tracker lacks, in order, a run of rounds (epochs, versions) as a range."""
    parts: list[list[str]] = []
    for what in whats:
        numbered = what.startswith(("round ", "version ", "epoch "))
        if numbered and parts and parts[-1][0].split()[0] == what.split()[0]:
            parts[-1].append(what)
        else:
            parts.append([what])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]} to {run[-1]}" for run in parts)


def open_sink(target: Target, default_folder: Path) -> Sink:
    """The sink of ``target``; ``default_folder``: where its files go unless it says."""
    where = target.where
    if target.kind == "tensorboard":
        return TensorBoardSink(Path(where) if where else default_folder)
    if where is None or not _is_uri(where):  # a folder: a local store there
        return MlflowSink(None, Path(where) if where else default_folder)
    return MlflowSink(where, default_folder)


def _is_uri(where: str) -> bool:
    return "://" in where or where.startswith(("sqlite:", "file:", "databricks"))


def with_absolute_place(value: str) -> str:
    """``value`` (a ``--track`` value) with its folder, if it names one, made absolute: a
    server's ServerApp runs in a folder of Flower's."""
    target = Target.parse(value)
    if target.where is None or (target.kind == "mlflow" and _is_uri(target.where)):
        return value
    return f"{target.kind}:{Path(target.where).resolve()}"


def check_targets(values: list[str]) -> list[Target]:
    """``--track`` values as targets, each checked before anything starts: its form,
    its library, and a place MLflow takes."""
    targets = [Target.parse(value) for value in values]
    _check_installed(targets)
    for target in targets:
        if target.kind == "mlflow" and target.where and target.where.startswith("file:"):
            raise FedgeError(f"--track {target}: MLflow no longer takes file stores; give "
                             "a folder instead (fedge keeps a SQLite store and the "
                             "artifacts there) or a server's http:// URI")
    if len({str(t) for t in targets}) < len(targets):
        raise FedgeError("--track names the same tracker twice")
    return targets
