"""On-device inference with onnxruntime alone: this module never imports torch."""

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.datafiles import IMAGE_SUFFIXES, is_image, read_image, stack_images
from fedge.errors import FedgeError

NO_PREDICTION = -1  # the class predict() gives a sample holding NaN or Inf
# ONNX metadata entry with the model's class names, a JSON list in class-id order
# (written by fedge.models.export, which imports torch: the key lives here).
CLASS_NAMES_KEY = "fedge.class_names"
INPUT_FORMS = ".npy, .csv, an image (.png, .jpg, .jpeg, .bmp) or a folder of images"


@dataclass(frozen=True)
class Inputs:
    """Samples to predict, and for images each one's file (relative to the folder)."""

    samples: np.ndarray
    files: list[str] | None = None


@dataclass(frozen=True)
class Predictions:
    """Each sample's class (:data:`NO_PREDICTION` for one holding NaN or Inf), its class
    probabilities (softmax; NaN for no prediction), and the model's class names (in id
    order; None when it has none)."""

    classes: np.ndarray
    probabilities: np.ndarray
    class_names: tuple[str, ...] | None


def load_inputs(path: Path, label_column: str = "label") -> np.ndarray:
    """Samples from a ``.npy`` array, a ``.csv`` file (one sample per row), an image or
    a folder of images: :func:`read_inputs` without the file names."""
    return read_inputs(path, label_column).samples


def read_inputs(path: Path, label_column: str = "label") -> Inputs:
    """Samples from a ``.npy`` array; a ``.csv`` file with one sample per row, with or
    without a header row (a first row that is not all numbers), whose ``label_column``
    is ignored; an image; or a folder of images, its sub-folders' (such as class
    folders) included. Images are raw 0..255 pixels, channels first, as for training."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    if not path.is_file():
        raise FedgeError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Inputs(read_image(path)[None], [path.name])
    if suffix not in (".npy", ".csv"):
        raise FedgeError(f"unsupported input file {path.name}: use {INPUT_FORMS}")
    try:
        if suffix == ".npy":
            inputs = np.load(path, allow_pickle=False)
        else:
            inputs = _read_csv(path, label_column)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise FedgeError(f"cannot read inputs from {path}: "
                         f"{str(error) or 'the file is empty'}") from error
    if not isinstance(inputs, np.ndarray) or inputs.ndim == 0 or len(inputs) == 0:
        raise FedgeError(f"{path} holds no samples")
    if inputs.dtype.kind not in "biuf":
        raise FedgeError(f"inputs in {path} must be numbers, not {inputs.dtype}")
    return Inputs(inputs)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, label_column: str) -> np.ndarray:
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        first = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if first is None:
            return np.zeros((0, 0))
        if all(_is_number(cell) for cell in first):  # no header: numbers only
            with warnings.catch_warnings():  # an empty file is reported by the caller
                warnings.simplefilter("ignore", UserWarning)
                return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
        header = [cell.strip() for cell in first]
        features = [i for i, name in enumerate(header) if name != label_column]
        if not features:
            raise ValueError(f"it has no columns besides {label_column!r}")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"line {reader.line_num} has {len(row)} values, but the "
                                 f"header names {len(header)} columns")
            values = []
            for i in features:
                if not _is_number(row[i]):
                    raise ValueError(f"line {reader.line_num} holds {row[i]!r} in column "
                                     f"{header[i]!r}, which is not a number")
                values.append(float(row[i]))
            rows.append(values)
    if not rows:
        raise ValueError(f"its first row ({', '.join(header)}) is not all numbers, so it is "
                         "a header, but no samples follow it")
    return np.array(rows, dtype=np.float64)


def _read_image_folder(root: Path) -> Inputs:
    files = sorted((p for p in root.rglob("*")
                    if is_image(p) and not any(part.startswith(".")
                                               for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).parts)
    if not files:
        raise FedgeError(f"{root} is a folder without images ({', '.join(IMAGE_SUFFIXES)}); "
                         f"give {INPUT_FORMS}")
    return Inputs(stack_images(files, root), [p.relative_to(root).as_posix() for p in files])


def _fit_to_model(inputs: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Accept a batch ``(n, *sample_shape)``, one sample, or flattened rows."""
    if inputs.shape == sample_shape:
        return inputs[None]
    if inputs.shape[1:] == sample_shape:
        return inputs
    size = int(np.prod(sample_shape))
    if inputs.ndim == 2 and inputs.shape[1] == size:
        return inputs.reshape(len(inputs), *sample_shape)
    if len(sample_shape) == 1 and inputs.ndim > 2 and int(np.prod(inputs.shape[1:])) == size:
        return inputs.reshape(len(inputs), size)  # e.g. images for a model of flat rows
    raise FedgeError(f"inputs of shape {inputs.shape} do not fit the model, which takes "
                     f"samples of shape {sample_shape} (or rows of {size} values)")


def class_names(session: object, model_path: Path) -> tuple[str, ...] | None:
    """The class names an ONNX model exported by fedge carries, in id order; None when
    its classes have no names."""
    text = session.get_modelmeta().custom_metadata_map.get(CLASS_NAMES_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise FedgeError(f"{model_path} has malformed class names in its metadata "
                         f"({CLASS_NAMES_KEY}: {text[:80]!r})")
    return tuple(names)


def run_model(model_path: Path, inputs: np.ndarray) -> Predictions:
    """Classes and class probabilities of every sample in ``inputs``; a sample that holds
    NaN or Inf, or values beyond float32's range, gets :data:`NO_PREDICTION` (a model's
    answer to it would be meaningless)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FedgeError(f"model file {model_path} does not exist")
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise FedgeError(f"{model_path} is not a valid ONNX model: {error}") from error
    names = class_names(session, model_path)
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
    width = session.get_outputs()[0].shape[-1]
    width = width if isinstance(width, int) else len(names or ())
    classes = np.full(len(batch), NO_PREDICTION, dtype=np.int64)
    probabilities = np.full((len(batch), width), np.nan, dtype=np.float32)
    if finite.any():
        feed = batch[finite].astype(np.int64) if dtype is np.int64 else as_float[finite]
        try:
            logits = session.run(None, {model_input.name: feed})[0]
        except Exception as error:  # e.g. a token id beyond the model's vocabulary
            raise FedgeError(f"onnxruntime cannot run {model_path} on these inputs: "
                             f"{error}") from error
        if names is not None and len(names) != logits.shape[1]:
            raise FedgeError(f"{model_path} names {len(names)} classes in its metadata but "
                             f"outputs {logits.shape[1]}")
        if probabilities.shape[1] != logits.shape[1]:
            probabilities = np.full((len(batch), logits.shape[1]), np.nan, dtype=np.float32)
        classes[finite] = logits.argmax(axis=1)
        probabilities[finite] = softmax(logits)
    return Predictions(classes, probabilities, names)


def predict(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Predicted class id of every sample in ``inputs``; :data:`NO_PREDICTION` for a
    sample that holds NaN or Inf, or values beyond float32's range."""
    return run_model(model_path, inputs).classes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def input_dtype(model_input: object) -> type:
    """The numpy type of an onnxruntime session input: token ids or float samples."""
    return np.int64 if getattr(model_input, "type", "") == "tensor(int64)" else np.float32
