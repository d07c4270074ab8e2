"""fedge's Python API: what the ``fedge`` command runs, for scripts and notebooks.

>>> import fedge
>>> result = fedge.simulate(model=Net, data=(x, y), init="pretrained.pt", clients=10,
...                         rounds=20)
>>> result.test_accuracy, result.run_dir
>>> fedge.predict(result.onnx_model, x[:5])
['scratch', 'good', 'good', 'scratch', 'good']
>>> fedge.evaluate(result.onnx_model, "test.csv")["accuracy"]
0.93

Settings are keyword arguments by their one name (``lr=``, ``partition=``,
``freeze=[...]``, ...), defined with their sections in :mod:`fedge.config`, as the command
line's options are. Bad input raises :class:`~fedge.errors.FedgeError`
with the message the command line prints. Heavy libraries load inside the functions.
"""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.config import (
    PredictOutput,
    Quantize,
    check_choice,
    check_flag,
    load_config,
)
from fedge.datafiles import LABEL_COLUMN, TEXT_COLUMN
from fedge.errors import FedgeError

if TYPE_CHECKING:
    from fedge.models.inference import Predictions

Data = str | Path | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SimulationResult:
    """A finished simulation: its run folder and what it measured."""

    run_dir: Path
    test_accuracy: float | None  # None for a task without accuracy (regression)
    test_loss: float
    best_round: int
    rounds_run: int
    stopped_early: bool
    rounds: list[dict]  # metrics.json's record of every round
    initial: dict | None  # the starting model's validation metrics (round 0)
    onnx_report: dict
    privacy: dict | None = None
    # Every measure of the task on the test set at the best round (metrics.json's "test").
    test: dict | None = None

    @property
    def onnx_model(self) -> Path:
        return self.run_dir / "model.onnx"


def simulate(model: str | Callable[..., Any] | None = None, data: Data | None = None, *,
             out: str | Path | None = None, config: str | Path | None = None,
             overwrite: bool = False, resume: bool = False,
             on_plan: Callable[[Any], None] | None = None,
             on_start: Callable[[dict], None] | None = None,
             on_round: Callable[[Any, bool], None] | None = None,
             record_wire: str | Path | None = None, verbose: bool = False,
             **settings: Any) -> SimulationResult:
    """Federate ``model`` over simulated clients on this machine and write a run folder.

    ``model``: a built-in name, ``"FILE.py:NAME"``, ``"package.module:NAME"``, or an
    ``nn.Module`` class or factory (called with the arguments it declares among
    ``input_shape``, ``num_classes``, ``dropout``). ``data``: a CSV, NPZ or image folder,
    or arrays ``(x, y)`` whose labels ``y`` are class ids or names (default: the
    ``dataset`` setting, digits). ``out``: the run folder (default ``runs/<timestamp>``).
    ``on_plan(plan)`` hears the checked plan before training starts, ``on_start(metrics)``
    the starting model's validation (round 0), ``on_round(record, best)`` every round.
    Flower's own log shows only its errors unless ``verbose``.
    """
    from fedge.simulations.runner import plan_simulation
    from fedge.simulations.runner import simulate as run

    for flag, name in ((overwrite, "overwrite"), (resume, "resume"), (verbose, "verbose")):
        check_flag(flag, name)
    for callback, name in ((on_plan, "on_plan"), (on_start, "on_start"),
                           (on_round, "on_round")):
        _check_callback(callback, name)
    out, config, record_wire = (_optional_path(value, name) for value, name in (
        (out, "out"), (config, "config"), (record_wire, "record_wire")))
    # Importing Flower set up its logger; it logs every round at INFO.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)

    factory = None
    if callable(model):
        from fedge.models.source import resolve_factory

        model, factory = resolve_factory(model)
    if isinstance(data, str | os.PathLike):
        settings["data"] = str(data)
    run_config = load_config(config, "simulate", model=model, **settings)
    samples = None
    if data is not None and not isinstance(data, str | os.PathLike):
        samples = _in_memory(data, run_config.task.name)
    if resume and out is None:
        raise FedgeError("resume needs out: the run folder to continue")
    plan = plan_simulation(run_config, samples, factory=factory)
    if on_plan:
        on_plan(plan)
    outcome = run(plan, out or new_run_dir(), overwrite=overwrite, on_round=on_round,
                  resume=resume, on_start=on_start, record_wire=record_wire, verbose=verbose)
    metrics = _read_metrics(outcome.run_dir)
    return SimulationResult(outcome.run_dir, outcome.test_accuracy, outcome.test_loss,
                            outcome.best_round, outcome.rounds_run, outcome.stopped_early,
                            metrics["rounds"], metrics["initial"], outcome.onnx_report,
                            outcome.privacy, metrics.get("test"))


def new_run_dir() -> Path:
    """``runs/<timestamp>``: where a run goes unless told otherwise."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _in_memory(data: object, task: str) -> Any:
    from fedge.datafiles import LabelledSamples, task_labels

    if not (isinstance(data, tuple) and len(data) == 2):
        raise FedgeError("data must be a path or a pair of arrays (x, y)")
    # Labels as the task has them here; the samples are checked as a data file's are
    # when planned.
    y, names = task_labels(np.asarray(data[1]), "the labels y", task)
    return LabelledSamples(np.asarray(data[0]), y, names)


def _path(value: object, name: str) -> Path:
    """A path argument, as the command line's path options take it."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise FedgeError(f"{name} must be a path (str or pathlib.Path), not {value!r}")
    return Path(value)


def _optional_path(value: object, name: str) -> Path | None:
    return None if value is None else _path(value, name)


def _check_callback(value: object, name: str) -> None:
    if value is not None and not callable(value):
        raise FedgeError(f"{name} must be a function (or None), not {value!r}")


def _column_names(value: object, name: str) -> tuple[str, ...]:
    """Column names: a list of strings, never one string (whose letters would be taken
    for names)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(
            isinstance(item, str) and item for item in value):
        raise FedgeError(f"{name} must be a list of column names, not {value!r}")
    return tuple(value)


def _read_metrics(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "metrics.json").read_text())


def export(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False,
           quantize: Quantize | None = None, eval_data: str | Path | None = None) -> dict:
    """Write a run's checkpoint (``checkpoint.pt`` or ``best.pt``) as an ONNX model,
    checked against torch in onnxruntime (int8 with ``quantize``, compared with fp32 by
    the task's headline measure on labelled ``eval_data``); the report. A pretrained
    Hugging Face model is quantized dynamically either way."""
    from fedge.files import check_output_file, folder_for
    from fedge.models.export import export_onnx
    from fedge.models.inference import labelled_samples
    from fedge.models.quantize import export_int8
    from fedge.models.registry import check_token_ids
    from fedge.server.checkpoint import load_checkpoint

    checkpoint, output = _path(checkpoint, "checkpoint"), _path(output, "output")
    eval_data = _optional_path(eval_data, "eval_data")
    check_flag(overwrite, "overwrite")
    if quantize is not None:
        check_choice(quantize, Quantize, "quantize")
    if eval_data is not None and quantize is None:
        raise FedgeError("eval_data is for comparing an int8 model with its fp32 model; "
                         "give quantize too")
    check_output_file(output, overwrite, source=checkpoint)
    saved = load_checkpoint(checkpoint)
    if quantize is None:
        with folder_for(output):
            report = export_onnx(saved.model(), saved.model_spec,
                                 saved.reference_inputs.numpy(), output)
        return {**report, "round": saved.round}
    eval_x = eval_y = None
    spec = saved.model_spec
    if eval_data is not None:
        eval_x, eval_y = labelled_samples(
            eval_data, task=spec.task, outputs=spec.num_classes, names=spec.class_names,
            sample_shape=spec.input_shape,
            text_column=TEXT_COLUMN if spec.pretrained is not None else None)
        if spec.pretrained is not None:  # texts as the model's token ids
            from fedge.models.hf import encode, load_tokenizer

            eval_x = encode(load_tokenizer(Path(spec.base_folder), spec.input_shape[0]), eval_x)
        if spec.builtin and spec.input_dtype == "int64":
            check_token_ids(eval_x, spec.vocab_size or 2, eval_data)
    # A transformer's activations (attention, GELU, layer norms) lose most to static ranges.
    method = "dynamic" if quantize == "int8-dynamic" or spec.pretrained else "static"
    with folder_for(output):
        report = export_int8(saved.model(), saved.model_spec, saved.reference_inputs.numpy(),
                             output, method, eval_x, eval_y)
    return {**report, "round": saved.round, "method": method}


def predict(model: str | Path, inputs: str | Path | np.ndarray, *,
            output: PredictOutput = "names", label_column: str = LABEL_COLUMN,
            ignore_columns: Sequence[str] = (),
            threshold: float | Sequence[float] | None = None,
            text_column: str = TEXT_COLUMN) -> list | np.ndarray:
    """Predict ``inputs`` (an array of samples, or a .npy, .npz, .csv, image file or image
    folder) with an ONNX model exported by fedge, in onnxruntime alone (no torch), as its
    task reads its outputs.

    ``names``: each sample's class name when the model has names, its id otherwise
    (multilabel: the list of its labels); ``ids``: class (label) ids; ``probabilities``:
    an array of per-class probabilities (binary: the positive class's; multilabel: each
    label's), rows of NaN where there is no prediction. A regression model gives an array
    of values, one column per target, whatever ``output`` (but ``probabilities``). A
    sample holding NaN or Inf is predicted ``None`` (regression: NaN). ``threshold``
    (binary, multilabel: one value, or one per label) replaces the model's stored one.
    A CSV's ``label_column``, its ``ignore_columns`` (e.g. a device id) and the columns
    the model records as no features (the training data's partition column) are skipped.
    A text model (``hf:`` models) takes texts: a list of strings, a .txt file of one per
    line, a .csv file's ``text_column``, an .npz of strings, or one text.
    """
    from fedge.models.inference import classify

    check_choice(output, PredictOutput, "output")
    if not isinstance(label_column, str):
        raise FedgeError(f"label_column must be a column name, not {label_column!r}")
    ignore_columns = _column_names(ignore_columns, "ignore_columns")
    inputs = _inputs(inputs)
    _, predictions = classify(_path(model, "model"), inputs, label_column, ignore_columns,
                              _threshold(threshold), text_column=text_column)
    if predictions.task == "regression":
        if output == "probabilities":
            raise FedgeError("a regression model predicts values, not probabilities: "
                             "leave output at 'names'")
        return predictions.scores
    if output == "probabilities":
        return predictions.scores
    return _decisions(predictions, output == "names")


def _inputs(inputs: object) -> Path | np.ndarray:
    """A path of inputs, or samples: an array of numbers."""
    if isinstance(inputs, str | os.PathLike):
        return Path(inputs)
    array = np.asarray(inputs)
    if array.ndim == 1 and array.dtype.kind == "U":  # a text model's texts
        return array
    if array.ndim == 0 or array.dtype.kind not in "biuf":
        raise FedgeError("inputs must be samples (an array of numbers) or the path of a "
                         f".npy, .npz, .csv, image file or image folder, not {inputs!r}")
    return array


def _threshold(value: object) -> tuple[float, ...] | None:
    """``threshold=``: None, a number, or one number per label."""
    if value is None:
        return None
    values = [value] if isinstance(value, int | float) else value
    if (isinstance(values, str) or not isinstance(values, Sequence) or not values
            or not all(isinstance(v, int | float) and not isinstance(v, bool)
                       and 0 < v < 1 for v in values)):
        raise FedgeError(f"threshold must be a number between 0 and 1, or a list of one per "
                         f"label, not {value!r}")
    return tuple(float(v) for v in values)


def _decisions(predictions: "Predictions", by_name: bool) -> list:
    """Each sample's class (name or id), or for multilabel the list of its labels; None
    where there is no prediction."""
    from fedge.models.inference import NO_PREDICTION

    names = predictions.class_names if by_name else None

    def shown(k: int) -> str | int:
        return names[k] if names else int(k)

    if predictions.task == "multilabel":
        return [[shown(k) for k in np.flatnonzero(row)] if done else None
                for row, done in zip(predictions.classes, predictions.predicted, strict=True)]
    return [None if c == NO_PREDICTION else shown(c) for c in predictions.classes]


def evaluate(model: str | Path, data: str | Path | tuple[np.ndarray, np.ndarray], *,
             label_column: str | None = None,
             threshold: float | Sequence[float] | None = None,
             text_column: str = TEXT_COLUMN) -> dict:
    """Judge an ONNX model exported by fedge on labelled ``data`` (a CSV, NPZ or image
    folder, or arrays ``(x, y)`` with labels as the model's task has them), in
    onnxruntime alone (no torch): its ``task``, the ``samples`` counted, and the task's
    measures (:data:`fedge.models.measures.SCALARS`, per-class, per-label or per-target
    tables, the confusion matrix), None where the data cannot define one.

    ``label_column``: the CSV's label column (multilabel, regression: its columns,
    separated by commas; default ``label``, or the model's label or target names);
    ``threshold`` (binary, multilabel) replaces the model's stored one. A text model
    reads the texts of a CSV's ``text_column`` (an NPZ: ``x`` of strings).
    """
    from fedge.models.inference import evaluate as run

    if label_column is not None and not (isinstance(label_column, str) and label_column):
        raise FedgeError(f"label_column must be a column name, not {label_column!r}")
    if isinstance(data, tuple):
        x = None if len(data) != 2 or isinstance(data[0], str | os.PathLike) else _inputs(
            data[0])
        if x is None:
            raise FedgeError("data must be a path or a pair of arrays (x, y)")
        data = (x, np.asarray(data[1]))
    else:
        data = _path(data, "data")
    return run(_path(model, "model"), data, label_column=label_column,
               threshold=_threshold(threshold), text_column=text_column)


def run_gateway(server: str, *, listen: str = "0.0.0.0:8443", ca: str | Path | None = None,
                key: str | Path | None = None, certs: str | Path | None = None,
                tokens: str | Path | None = None, round_deadline: float = 60.0,
                min_devices: int = 1, join_timeout: float = 600.0, verbose: bool = False,
                started: float | None = None, metrics_port: int | None = None) -> str:
    """Serve ExecuTorch devices (``fedge-device``, or a phone app speaking
    ``client/device/PROTOCOL.md``) as one node of the federation at ``server``, until the
    server's run finishes (returns its summary).

    Toward the server the gateway is a client (``ca``: the server's CA; ``key``: this
    gateway's node key; both None: plaintext, loopback only); toward devices it serves
    HTTPS on ``listen`` with ``certs``' ``server.pem`` and ``server.key`` (None:
    plaintext) to the devices whose tokens ``tokens`` holds (``NAME.sha256`` files from
    ``fedge tokens``; default: ``certs/tokens``). Each round waits at most
    ``round_deadline`` seconds for at least ``min_devices`` results. With
    ``metrics_port``, the devices' metrics are served in Prometheus' text format there,
    on ``listen``'s host (needs ``pip install 'fedge[tracking]'``).
    """
    import time

    from fedge.client.deployment import Connection, parse_server_address, run_node
    from fedge.client.gateway import build_gateway_trainer
    from fedge.server.certs import check_server_certificates
    from fedge.server.device_tokens import read_token_digests
    from fedge.server.gateway import DeviceFleet, GatewaySettings
    from fedge.server.operator_metrics import (
        GatewayMetrics,
        check_metrics_port,
        serving_metrics,
    )

    started = time.monotonic() if started is None else started
    connection = Connection(server, None if ca is None else Path(ca),
                            None if key is None else Path(key), join_timeout)
    connection.check()
    host, port = parse_server_address(listen, "--listen")
    if metrics_port is not None:
        check_metrics_port(host, metrics_port, {"the gateway's --listen port": port})
    settings = GatewaySettings(round_deadline=round_deadline, min_devices=min_devices)
    certfile = keyfile = None
    if certs is not None:
        check_server_certificates(Path(certs))  # the SuperLink's check serves the gateway
        certfile, keyfile = Path(certs) / "server.pem", Path(certs) / "server.key"
    if tokens is None and certs is None:
        raise FedgeError("give --tokens: the folder of NAME.sha256 files made by "
                         "`fedge tokens`")
    fleet = DeviceFleet(read_token_digests(Path(tokens) if tokens else Path(certs) / "tokens"),
                        settings)
    with fleet.serving(host, port, certfile, keyfile), serving_metrics(
            host, metrics_port, GatewayMetrics(fleet)):
        summary = run_node(connection, build_gateway_trainer(fleet.run_round),
                           verbose=verbose, started=started)
        fleet.finish(summary)
    return summary
