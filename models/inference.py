"""On-device inference with onnxruntime alone: this module never imports torch."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.datafiles import (
    IMAGE_SUFFIXES,
    LABEL_COLUMN,
    csv_rows,
    is_image,
    is_number,
    read_image,
    read_numbers,
    stack_images,
)
from fedge.errors import FedgeError

NO_PREDICTION = -1  # the class predict() gives a sample holding NaN or Inf
# ONNX metadata entry with the model's class names, a JSON list in class-id order
# (written by fedge.models.export, which imports torch: the key lives here).
CLASS_NAMES_KEY = "fedge.class_names"
# The run's CSV columns that are no features (its label column, a column:NAME partition's
# column), a JSON list: `fedge predict` skips them in the files the model was trained on.
NON_FEATURE_COLUMNS_KEY = "fedge.non_feature_columns"
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


def read_inputs(path: Path, label_column: str = LABEL_COLUMN,
                ignore_columns: Sequence[str] = (), model_columns: Sequence[str] = ()) -> Inputs:
    """Samples from a ``.npy`` array; a ``.csv`` file with one sample per row, with or
    without a header row, whose ``label_column``, ``ignore_columns`` and the model's own
    non-feature ``model_columns`` are skipped; an image; or a folder of images, its
    sub-folders' (such as class folders) included. Images are raw 0..255 pixels, channels
    first, as for training."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    if not path.is_file():
        raise FedgeError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if ignore_columns and suffix != ".csv":
        raise FedgeError(f"{path.name} is not a .csv file: it has no columns to ignore "
                         f"({', '.join(ignore_columns)})")
    if suffix in IMAGE_SUFFIXES:
        return Inputs(read_image(path)[None], [path.name])
    if suffix not in (".npy", ".csv"):
        raise FedgeError(f"unsupported input file {path.name}: use {INPUT_FORMS}")
    try:
        if suffix == ".npy":
            inputs = np.load(path, allow_pickle=False)
        else:
            inputs = _read_csv(path, (label_column, *model_columns), ignore_columns)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise FedgeError(f"cannot read inputs from {path}: "
                         f"{str(error) or 'the file is empty'}") from error
    if not isinstance(inputs, np.ndarray) or inputs.ndim == 0 or len(inputs) == 0:
        raise FedgeError(f"{path} holds no samples")
    if inputs.dtype.kind not in "biuf":
        raise FedgeError(f"inputs in {path} must be numbers, not {inputs.dtype}")
    return Inputs(inputs)


def _read_csv(path: Path, skipped: Sequence[str], ignored: Sequence[str]) -> np.ndarray:
    """A CSV's samples. Its first row is a header when it holds no number or names a
    column to skip (``skipped``: the label's, the model's; ``ignored``: the user's, which
    must be there); a row of numbers is a sample; a row of numbers with text among them
    is a mistake, not a header that would drop a sample unnoticed."""
    line, first = next(csv_rows(path, 0), (0, None))
    if first is None:
        return np.zeros((0, 0))
    cells = [cell.strip() for cell in first]
    numbers = [is_number(cell) for cell in cells]
    names = {*skipped, *ignored}
    if all(numbers):
        if ignored:
            raise ValueError(f"it has no header row, so it has no column "
                             f"{', '.join(map(repr, ignored))} to ignore")
        return _read_rows(path, line - 1, None, len(cells), [])
    if any(numbers) and not names & set(cells):
        at = numbers.index(False)
        raise ValueError(f"line {line} holds {cells[at]!r} in column {at + 1}, which is not a "
                         "number; a first row of numbers with text among them is neither a "
                         "sample nor a header (which holds no number, or names the label "
                         "column or an ignored column)")
    missing = [name for name in ignored if name not in cells]
    if missing:
        raise FedgeError(f"{path} has no column {missing[0]!r} to ignore; its columns are: "
                         f"{', '.join(cells)}")
    skip = [i for i, name in enumerate(cells) if name in names]
    if len(skip) == len(cells):
        raise ValueError(f"it has no columns besides {', '.join(cells)}, which are skipped")
    samples = _read_rows(path, line, cells, len(cells), skip)
    if not len(samples):
        raise ValueError(f"its first row ({', '.join(cells)}) is not all numbers, so it is "
                         "a header, but no samples follow it")
    return samples


def _read_rows(path: Path, skip_lines: int, header: list[str] | None, width: int,
               skip: list[int]) -> np.ndarray:
    """The rows after ``skip_lines`` lines, without the columns ``skip``, as float64; a
    ValueError names the line and column of a row that does not fit."""
    features = [i for i in range(width) if i not in skip]
    try:
        table = read_numbers(path, skip_lines, width, skip, np.float64)
    except ValueError:
        for line, row in csv_rows(path, skip_lines):
            if len(row) != width:
                raise ValueError(f"line {line} has {len(row)} values, but the "
                                 f"{'first row has' if header is None else 'header names'} "
                                 f"{width}") from None
            for i in features:
                if not is_number(row[i]):
                    column = f"column {i + 1}" if header is None else f"column {header[i]!r}"
                    raise ValueError(f"line {line} holds {row[i]!r} in {column}, which is "
                                     "not a number") from None
        raise
    return table[:, features] if skip else table


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


@dataclass(frozen=True)
class Classifier:
    """An ONNX model exported by fedge, loaded in onnxruntime, and what its metadata says:
    the class names in id order (None: ids only) and the training data's non-feature
    CSV columns."""

    path: Path
    session: Any
    class_names: tuple[str, ...] | None
    non_feature_columns: tuple[str, ...]


def load_classifier(model_path: Path) -> Classifier:
    """The ONNX model at ``model_path``, checked to be one fedge can feed."""
    import onnxruntime as ort

    model_path = Path(model_path)
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
    names = _metadata_names(session, CLASS_NAMES_KEY, model_path, "class names")
    columns = _metadata_names(session, NON_FEATURE_COLUMNS_KEY, model_path, "columns")
    return Classifier(model_path, session, names, columns or ())


def _metadata_names(session: Any, key: str, model_path: Path, what: str
                    ) -> tuple[str, ...] | None:
    """The JSON list of names under ``key`` in the model's metadata; None without one."""
    text = session.get_modelmeta().custom_metadata_map.get(key)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise FedgeError(f"{model_path} has malformed {what} in its metadata "
                         f"({key}: {text[:80]!r})")
    return tuple(names)


def classify(model_path: Path, inputs: Path | np.ndarray,
             label_column: str = LABEL_COLUMN, ignore_columns: Sequence[str] = ()
             ) -> tuple[Inputs, Predictions]:
    """``inputs`` (samples, or a file or folder of them: :func:`read_inputs`, which also
    skips the columns the model records as no features) and the model's predictions."""
    classifier = load_classifier(model_path)
    if isinstance(inputs, np.ndarray):
        if ignore_columns:
            raise FedgeError(f"the inputs are an array, not a CSV file: they have no "
                             f"columns to ignore ({', '.join(ignore_columns)})")
        given = Inputs(inputs)
    else:
        given = read_inputs(Path(inputs), label_column, ignore_columns,
                            classifier.non_feature_columns)
    return given, run_model(classifier, given.samples)


def run_model(model: Path | Classifier, inputs: np.ndarray) -> Predictions:
    """Classes and class probabilities of every sample in ``inputs``; a sample that holds
    NaN or Inf, or values beyond float32's range, gets :data:`NO_PREDICTION` (a model's
    answer to it would be meaningless)."""
    classifier = model if isinstance(model, Classifier) else load_classifier(model)
    session, names, model_path = classifier.session, classifier.class_names, classifier.path
    model_input = session.get_inputs()[0]
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
