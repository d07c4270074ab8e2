"""Export to ONNX with a dynamic batch axis, verified against torch in onnxruntime.

What is exported is :func:`fedge.models.tasks.for_export` of the network: logits for the
tasks with classes and labels, values in the user's units for regression; the ONNX
metadata records the task, its threshold and names (:data:`TASK_KEY`), which
:mod:`fedge.models.inference` reads on a device.
"""

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedge.errors import FedgeError
from fedge.files import temporary_sibling
from fedge.models.hf import TextClassifier, load_tokenizer
from fedge.models.inference import (
    CLASS_NAMES_KEY,
    NON_FEATURE_COLUMNS_KEY,
    TASK_KEY,
    TOKENIZER_KEY,
)
from fedge.models.program import ProgramModel
from fedge.models.registry import ModelSpec, as_input_tensor
from fedge.models.tasks import for_export

if TYPE_CHECKING:
    import onnx

PARITY_TOLERANCE = 1e-4


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about optional torchvision ops and its own deprecations."""
    # onnxscript's constant folding warns of every node it leaves to the runtime.
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # A program's graphs have no train/eval switch; its eval graph is exported.
            warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _finish_metadata(path: Path, spec: ModelSpec) -> "onnx.ModelProto":
    """Remove the exporter's per-node debug metadata (FX node names, module paths, source
    stack traces with this machine's file paths) from the file, add the task (with its
    threshold and names), the class names and the data's non-feature columns, and return
    the model: devices never read the former, and it is over 6 % of a small model's file
    (a fifth of its int8 version)."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    props = {TASK_KEY: task_metadata(spec)}
    if spec.class_names is not None:
        props[CLASS_NAMES_KEY] = json.dumps(spec.class_names)
    if spec.non_feature_columns:
        props[NON_FEATURE_COLUMNS_KEY] = json.dumps(spec.non_feature_columns)
    if spec.pretrained is not None and spec.base_folder is not None:
        props[TOKENIZER_KEY] = load_tokenizer(Path(spec.base_folder),
                                              spec.input_shape[0]).to_str()
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return model


def task_metadata(spec: ModelSpec) -> str:
    """The :data:`TASK_KEY` entry: the task, its decision threshold (binary: one;
    multilabel: one per label; null: 0.5, or none for the task) and its names."""
    return json.dumps({
        "task": spec.task,
        "threshold": None if spec.threshold is None else list(spec.threshold),
        "names": None if spec.class_names is None else list(spec.class_names),
    })


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def export_onnx(model: nn.Module, spec: ModelSpec, reference_inputs: np.ndarray,
                path: Path, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Write ``model`` to ``path`` as ONNX and return a parity report.

    The graph is checked with ``onnx.checker`` and run in onnxruntime on
    ``reference_inputs`` (real held-out samples); the largest absolute difference to
    the torch module exported (:func:`~fedge.models.tasks.for_export`: logits, or
    regression's values) must not exceed ``tolerance``. ``path`` only appears once it
    passed.
    """
    import onnx  # with onnxruntime, about a second: only when exporting
    import onnxruntime as ort

    model = model.eval().cpu()
    if isinstance(model, TextClassifier):
        model = model.merged().eval()  # adapters into the base: a plain transformer
    exported_module = for_export(model, spec).eval()
    traced = (for_export(model.inference_module(), spec) if isinstance(model, ProgramModel)
              else exported_module)
    inputs = as_input_tensor(spec, reference_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with torch.no_grad(), _quiet_exporter():
            try:
                torch.onnx.export(
                    traced, (inputs[:2],), tmp, dynamo=True, external_data=False,
                    input_names=["input"], output_names=["logits"],
                    dynamic_shapes=({0: "batch"},), verbose=False,
                )
            except Exception as error:  # the exporter's errors have no common base class
                raise FedgeError(f"the model cannot be exported to ONNX: "
                                 f"{_first_line(error)}") from error
            expected = exported_module(inputs).numpy()
        if not np.isfinite(expected).all():
            raise FedgeError("the model's outputs on the reference inputs are not finite "
                             "(NaN or Inf), so its ONNX export cannot be verified and was "
                             "not written")
        exported = _finish_metadata(tmp, spec)
        onnx.checker.check_model(exported)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        actual = session.run(None, {"input": inputs.numpy()})[0]
        with np.errstate(all="ignore"):
            max_abs_diff = float(np.max(np.abs(actual - expected)))
        # float32 rounding grows with the logits' magnitude (a noisy DP or attacked model
        # can have logits in the thousands): the tolerance is relative beyond 1.
        allowed = tolerance * max(1.0, float(np.max(np.abs(expected))))
        if not max_abs_diff <= allowed:
            raise FedgeError(f"the ONNX model differs from torch by {max_abs_diff:.3g} "
                             f"(tolerance {allowed:.3g}), so it was not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": path.name,
        "opset": next(o.version for o in exported.opset_import if o.domain == ""),
        "size_bytes": path.stat().st_size,
        "max_abs_diff": max_abs_diff,
        "tolerance": allowed,
        "compared_samples": len(reference_inputs),
        "input_shape": ["batch", *spec.input_shape],
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }
