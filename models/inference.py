"""On-device inference with onnxruntime alone: this module never imports torch."""

import warnings
from pathlib import Path

import numpy as np

from fedge.errors import FedgeError

NO_PREDICTION = -1  # the class predict() gives a sample holding NaN or Inf


def load_inputs(path: Path) -> np.ndarray:
    """Samples from a ``.npy`` array or a ``.csv`` file (one sample per row)."""
    if path.is_dir():
        raise FedgeError(f"{path} is a folder; give a .npy or .csv file of samples")
    if not path.is_file():
        raise FedgeError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise FedgeError(f"unsupported input file {path.name}: use .npy or .csv")
    try:
        if suffix == ".npy":
            inputs = np.load(path, allow_pickle=False)
        else:
            with warnings.catch_warnings():  # an empty file is reported below, once
                warnings.simplefilter("ignore", UserWarning)
                inputs = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise FedgeError(f"cannot read inputs from {path}: "
                         f"{str(error) or 'the file is empty'}") from error
    if not isinstance(inputs, np.ndarray) or inputs.ndim == 0 or len(inputs) == 0:
        raise FedgeError(f"{path} holds no samples")
    if inputs.dtype.kind not in "biuf":
        raise FedgeError(f"inputs in {path} must be numbers, not {inputs.dtype}")
    return inputs


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
    """Predicted class of every sample in ``inputs``; :data:`NO_PREDICTION` for a sample
    that holds NaN or Inf, or values beyond float32's range (a model's answer to it
    would be meaningless)."""
    import onnxruntime as ort

    if not model_path.is_file():
        raise FedgeError(f"model file {model_path} does not exist")
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise FedgeError(f"{model_path} is not a valid ONNX model: {error}") from error
    model_input = session.get_inputs()[0]
    if not all(isinstance(d, int) for d in model_input.shape[1:]):
        raise FedgeError(f"{model_path} takes inputs of shape {model_input.shape}, not a "
                         "batch of fixed-size samples: it was not exported by fedge")
    batch = _fit_to_model(np.asarray(inputs), tuple(model_input.shape[1:]))
    dtype = input_dtype(model_input)
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = batch.astype(np.float32)
    finite = np.isfinite(as_float).all(axis=tuple(range(1, batch.ndim)))
    ids = batch[finite]
    if dtype is np.int64 and not ((ids >= 0).all() and (ids % 1 == 0).all()):
        raise FedgeError("the model takes token ids: inputs must be whole numbers ≥ 0")
    classes = np.full(len(batch), NO_PREDICTION, dtype=np.int64)
    if finite.any():
        feed = batch[finite].astype(np.int64) if dtype is np.int64 else as_float[finite]
        try:
            logits = session.run(None, {model_input.name: feed})[0]
        except Exception as error:  # e.g. a token id beyond the model's vocabulary
            raise FedgeError(f"onnxruntime cannot run {model_path} on these inputs: "
                             f"{error}") from error
        classes[finite] = logits.argmax(axis=1)
    return classes


def input_dtype(model_input: object) -> type:
    """The numpy type of an onnxruntime session input: token ids or float samples."""
    return np.int64 if getattr(model_input, "type", "") == "tensor(int64)" else np.float32
