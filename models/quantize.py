"""int8 ONNX models for the edge, made and checked with onnxruntime's quantization tools.

``static`` (the default) calibrates activation ranges on real held-out samples and
writes a QDQ graph with per-channel int8 weights (biases stay fp32); ``dynamic``
quantizes weights only and computes activation scales at run time. Either way the int8
model is compared with the fp32 model it came from: size, agreement of predictions and
the task's headline measure (:data:`fedge.models.measures.HEADLINE`: accuracy for
classification) on held-out samples, batch-1 latency.
"""

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from fedge.errors import FedgeError
from fedge.files import temporary_sibling, write_atomic
from fedge.models.export import export_onnx
from fedge.models.inference import Predictions, input_dtype, judged, run_model
from fedge.models.measures import HEADLINE
from fedge.models.registry import ModelSpec

Method = Literal["static", "dynamic"]
LATENCY_RUNS = 200


class _CalibrationSamples(CalibrationDataReader):
    """One held-out sample per calibration step, as onnxruntime's calibrator expects."""

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._feeds: Iterator[dict] = iter({input_name: samples[i:i + 1]}
                                           for i in range(len(samples)))

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray,
                  method: Method = "static") -> None:
    """Write the int8 version of the ONNX model ``fp32`` to ``out`` (atomically);
    ``calibration`` are real samples in the model's input shape."""
    model_input = session(fp32).get_inputs()[0]
    samples = calibration.astype(input_dtype(model_input))
    prepared, tmp = temporary_sibling(out), temporary_sibling(out)
    try:
        quant_pre_process(str(fp32), str(prepared))
        if method == "static":
            quantize_static(str(prepared), str(tmp), _CalibrationSamples(model_input.name, samples),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                            # An int32 bias needs an fp32 scale and an int32 zero point
                            # per channel: 3× the fp32 bias it replaces, no faster.
                            extra_options={"QuantizeBias": False})
        else:
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8)
        session(tmp)  # fail here, not on a device, if onnxruntime cannot load it
        os.replace(tmp, out)
    except Exception as error:  # onnxruntime's quantizer raises untyped errors
        raise FedgeError(f"int8 quantization failed, so nothing was written: "
                         f"{str(error) or type(error).__name__}") from error
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def latency_us(model: Path, sample: np.ndarray, batch: int = 1,
               runs: int = LATENCY_RUNS) -> float:
    """Median microseconds per call on one thread, after a warm-up call."""
    runner = session(model)
    model_input = runner.get_inputs()[0]
    feed = {model_input.name: np.repeat(sample[None], batch, 0).astype(input_dtype(model_input))}
    runner.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runner.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def compare(fp32: Path, int8: Path, x: np.ndarray, y: np.ndarray | None = None) -> dict:
    """Both models on held-out samples ``x``: size, batch-1 latency, the share of samples
    where int8 predicts what fp32 predicts (regression: the largest difference of their
    values instead), and the task's headline measure (``measure``) when labels ``y`` are
    given."""
    predictions = {name: run_model(path, x) for name, path in (("fp32", fp32), ("int8", int8))}
    task = predictions["fp32"].task
    measure = HEADLINE[task]
    report: dict = {"evaluated_samples": len(x), "task": task, "measure": measure}
    for name, path in (("fp32", fp32), ("int8", int8)):
        report[name] = {
            "size_bytes": path.stat().st_size,
            "latency_us_batch1": latency_us(path, x[0]),
            measure: None if y is None else judged(predictions[name], y,
                                                   "the evaluation data")[measure],
        }
    report["size_ratio"] = report["int8"]["size_bytes"] / report["fp32"]["size_bytes"]
    report["agreement"] = agreement(predictions["fp32"], predictions["int8"])
    if task == "regression":
        report["max_abs_difference"] = float(np.max(np.abs(
            predictions["int8"].scores - predictions["fp32"].scores)))
    return report


def agreement(fp32: Predictions, int8: Predictions) -> float | None:
    """The share of samples where int8 decides as fp32 does: the same class, or the same
    set of labels; None for regression, whose values are never exactly equal."""
    if fp32.classes is None or int8.classes is None:
        return None
    same = (fp32.classes == int8.classes).reshape(len(fp32.classes), -1).all(axis=1)
    return float(np.mean(same))


def export_int8(model: nn.Module, spec: ModelSpec, reference_inputs: np.ndarray, out: Path,
                method: Method = "static", eval_x: np.ndarray | None = None,
                eval_y: np.ndarray | None = None) -> dict:
    """Export ``model`` (fp32, parity-checked against torch), quantize it to ``out``, and
    compare the two on ``eval_x``/``eval_y`` (default: the reference inputs, unlabelled).
    Calibration uses the reference inputs: real held-out samples kept in checkpoints."""
    with tempfile.TemporaryDirectory(prefix="fedge-int8-") as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        export_onnx(model, spec, reference_inputs, fp32)
        quantize_int8(fp32, int8, reference_inputs, method)
        x = reference_inputs if eval_x is None else eval_x
        report = {"method": method, **compare(fp32, int8, x, eval_y)}
        write_atomic(out, int8.read_bytes())
    return report
