"""On-device inference with onnxruntime alone: this module never imports torch."""

from pathlib import Path

import numpy as np

from fedge.errors import FedgeError


def load_inputs(path: Path) -> np.ndarray:
    """Samples from a ``.npy`` array or a ``.csv`` file (one sample per row)."""
    if not path.is_file():
        raise FedgeError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".csv":
            return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except (ValueError, OSError) as error:
        raise FedgeError(f"cannot read inputs from {path}: {error}") from error
    raise FedgeError(f"unsupported input file {path.name}: use .npy or .csv")


def _fit_to_model(inputs: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Accept a batch ``(n, *sample_shape)``, one sample, or flattened rows."""
    if inputs.shape == sample_shape:
        return inputs[None]
    if inputs.shape[1:] == sample_shape:
        return inputs
    size = int(np.prod(sample_shape))
    if inputs.ndim == 2 and inputs.shape[1] == size:
        return inputs.reshape(len(inputs), *sample_shape)
    raise FedgeError(f"inputs of shape {inputs.shape} do not fit the model, which takes "
                     f"samples of shape {sample_shape} (or rows of {size} values)")


def predict(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Predicted class of every sample in ``inputs``."""
    import onnxruntime as ort

    if not model_path.is_file():
        raise FedgeError(f"model file {model_path} does not exist")
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise FedgeError(f"{model_path} is not a valid ONNX model: {error}") from error
    model_input = session.get_inputs()[0]
    sample_shape = tuple(int(d) for d in model_input.shape[1:])
    batch = _fit_to_model(np.asarray(inputs), sample_shape).astype(input_dtype(model_input))
    logits = session.run(None, {model_input.name: batch})[0]
    return logits.argmax(axis=1)


def input_dtype(model_input: object) -> type:
    """The numpy type of an onnxruntime session input: token ids or float samples."""
    return np.int64 if getattr(model_input, "type", "") == "tensor(int64)" else np.float32
