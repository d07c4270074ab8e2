"""On-device inference with onnxruntime alone: this module never imports torch.

What a model's outputs mean follows its task, which its ONNX metadata records
(:data:`TASK_KEY`; a model without it is a classification model, as every model exported
before tasks was): class logits (classification), the positive class's logit (binary),
one logit per label (multilabel), or values in the user's units (regression).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.datafiles import (
    IMAGE_SUFFIXES,
    LABEL_COLUMN,
    TEXT_COLUMN,
    csv_rows,
    is_image,
    is_number,
    read_image,
    read_numbers,
    stack_images,
)
from fedge.errors import FedgeError
from fedge.models.measures import DEFAULT_THRESHOLD, SCALARS, measures

NO_PREDICTION = -1  # the class predict() gives a sample holding NaN or Inf
# ONNX metadata entry with the model's class names, a JSON list in class-id order
# (written by fedge.models.export, which imports torch: the key lives here).
CLASS_NAMES_KEY = "fedge.class_names"
# The run's CSV columns that are no features (its label column, a column:NAME partition's
# column), a JSON list: `fedge predict` skips them in the files the model was trained on.
NON_FEATURE_COLUMNS_KEY = "fedge.non_feature_columns"
# The model's task, a JSON object: {"task": ..., "threshold": [one per output] or null,
# "names": the class, label or target names or null}.
TASK_KEY = "fedge.task"
# A text model's tokenizer (the tokenizers library's JSON), truncating and padding every
# text to the model's length: the model takes raw strings on a device.
TOKENIZER_KEY = "fedge.tokenizer"
TEXT_FORMS = ("a text, a .txt file of one text per line, a .csv file with a text column, or "
              "an .npz file whose x holds strings")
TASKS = tuple(SCALARS)
INPUT_FORMS = (".npy, .npz (array x), .csv, an image (.png, .jpg, .jpeg, .bmp) or a folder "
               "of images")


@dataclass(frozen=True)
class Inputs:
    """Samples to predict; for images each one's file (relative to the folder), for a CSV
    read with an id column each one's id (kept to name its prediction, never fed)."""

    samples: np.ndarray
    files: list[str] | None = None
    ids: list[str] | None = None
    id_column: str | None = None

    @property
    def keys(self) -> tuple[str, list[str]] | None:
        """What names each sample in the output: (column title, one value per sample)."""
        if self.files is not None:
            return "file", self.files
        if self.ids is not None:
            return self.id_column or "id", self.ids
        return None


@dataclass(frozen=True)
class Predictions:
    """The model's answer for each sample, as its task reads it.

    ``scores``: class probabilities (classification, ``(n, classes)``), the positive
    class's probability (binary, ``(n,)``), each label's probability (multilabel,
    ``(n, labels)``), values in the user's units (regression, ``(n, targets)``); NaN where
    there is no prediction. ``classes``: the class id (classification; binary: positive
    when its probability reaches the threshold), each label's 0/1 (multilabel,
    ``(n, labels)``), :data:`NO_PREDICTION` where there is none; None for regression.
    ``predicted``: whether the sample got a prediction (it held no NaN, Inf or value
    beyond float32's range). ``threshold``: the thresholds used (binary: one; multilabel:
    one per label; else None); ``class_names``: the class, label or target names.
    """

    task: str
    scores: np.ndarray
    classes: np.ndarray | None
    predicted: np.ndarray
    class_names: tuple[str, ...] | None
    threshold: tuple[float, ...] | None = None


def read_inputs(path: Path, label_column: str = LABEL_COLUMN,
                ignore_columns: Sequence[str] = (), model_columns: Sequence[str] = (),
                id_column: str | None = None) -> Inputs:
    """Samples from a ``.npy`` array or an ``.npz``'s array ``x``; a ``.csv`` file with one
    sample per row, with or without a header row, whose ``label_column``,
    ``ignore_columns`` and the model's own non-feature ``model_columns`` are skipped, and
    whose ``id_column`` names each sample; an image; or a folder of images, its
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
    if id_column is not None and suffix != ".csv":
        raise FedgeError(f"{path.name} is not a .csv file: it has no id column "
                         f"{id_column!r}")
    if suffix in IMAGE_SUFFIXES:
        return Inputs(read_image(path)[None], [path.name])
    if suffix not in (".npy", ".npz", ".csv"):
        raise FedgeError(f"unsupported input file {path.name}: use {INPUT_FORMS}")
    ids = None
    try:
        if suffix == ".npy":
            inputs = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            inputs = _read_npz_samples(path)
        else:
            inputs, ids = _read_csv(path, (label_column, *model_columns), ignore_columns,
                                    id_column)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise FedgeError(f"cannot read inputs from {path}: "
                         f"{str(error) or 'the file is empty'}") from error
    if not isinstance(inputs, np.ndarray) or inputs.ndim == 0 or len(inputs) == 0:
        raise FedgeError(f"{path} holds no samples")
    if inputs.dtype.kind not in "biuf":
        raise FedgeError(f"inputs in {path} must be numbers, not {inputs.dtype}")
    return Inputs(inputs, ids=ids, id_column=id_column)


def _read_npz_samples(path: Path) -> np.ndarray:
    """The array ``x`` of an ``.npz`` archive (its ``y``, if any, is not needed)."""
    with np.load(path, allow_pickle=False) as arrays:
        if "x" not in arrays.files:
            raise ValueError(f"it has no array 'x' of samples; its arrays are: "
                             f"{', '.join(arrays.files) or 'none'}")
        return arrays["x"]


def _read_csv(path: Path, skipped: Sequence[str], ignored: Sequence[str],
              id_column: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """A CSV's samples, and each one's ``id_column`` value when asked. Its first row is a
    header when it holds no number or names a column to skip (``skipped``: the label's,
    the model's; ``ignored``: the user's, which must be there); a row of numbers is a
    sample; a row of numbers with text among them is a mistake, not a header that would
    drop a sample unnoticed."""
    line, first = next(csv_rows(path, 0), (0, None))
    if first is None:
        return np.zeros((0, 0)), None
    cells = [cell.strip() for cell in first]
    numbers = [is_number(cell) for cell in cells]
    names = {*skipped, *ignored, *([id_column] if id_column else [])}
    if all(numbers):
        if ignored:
            raise ValueError(f"it has no header row, so it has no column "
                             f"{', '.join(map(repr, ignored))} to ignore")
        if id_column is not None:
            raise ValueError(f"it has no header row, so it has no id column {id_column!r}")
        return _read_rows(path, line - 1, None, len(cells), []), None
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
    if id_column is not None and id_column not in cells:
        raise FedgeError(f"{path} has no id column {id_column!r}; its columns are: "
                         f"{', '.join(cells)}")
    skip = [i for i, name in enumerate(cells) if name in names]
    if len(skip) == len(cells):
        raise ValueError(f"it has no columns besides {', '.join(cells)}, which are skipped")
    samples = _read_rows(path, line, cells, len(cells), skip)
    if not len(samples):
        raise ValueError(f"its first row ({', '.join(cells)}) is not all numbers, so it is "
                         "a header, but no samples follow it")
    if id_column is None:
        return samples, None
    at = cells.index(id_column)
    return samples, [row[at].strip() for _, row in csv_rows(path, line)]


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


def text_inputs(inputs: Path | np.ndarray, text_column: str = TEXT_COLUMN,
                id_column: str | None = None) -> Inputs:
    """Texts to predict: strings; a ``.txt`` file of one per line (blank lines skipped);
    a ``.csv`` file's ``text_column`` (its ``id_column`` names each text); an ``.npz``
    file's ``x`` of strings; or, for a path that names no file and has none of these
    suffixes, that text itself (``fedge predict model.onnx "my card was charged twice"``)."""
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind != "U":
            raise FedgeError(f"the model takes texts: give {TEXT_FORMS}, not an array of "
                             f"{inputs.dtype}")
        return Inputs(inputs.reshape(-1))
    path, suffix = Path(inputs), Path(inputs).suffix.lower()
    if id_column is not None and suffix != ".csv":
        raise FedgeError(f"{path.name} is not a .csv file: it has no id column {id_column!r}")
    if not path.exists() and suffix not in (".txt", ".csv", ".npz", ".npy"):
        return Inputs(np.array([str(inputs)]))
    if not path.is_file():
        raise FedgeError(f"input file {path} does not exist")
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            texts, ids = np.array([line for line in lines if line.strip()], dtype=str), None
        elif suffix == ".csv":
            texts, ids = _csv_texts(path, text_column, id_column)
        elif suffix == ".npz":
            texts, ids = _read_npz_samples(path), None
        else:
            raise FedgeError(f"the model takes texts: give {TEXT_FORMS}, not {path.name}")
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise FedgeError(f"cannot read texts from {path}: {error}") from error
    if texts.dtype.kind != "U" or texts.ndim != 1:
        raise FedgeError(f"{path} holds {texts.dtype} of shape {texts.shape}, not one text "
                         "per sample")
    if not len(texts):
        raise FedgeError(f"{path} holds no texts")
    return Inputs(texts, ids=ids, id_column=id_column)


def _csv_texts(path: Path, text_column: str, id_column: str | None
               ) -> tuple[np.ndarray, list[str] | None]:
    rows = list(csv_rows(path, 0))
    header = [cell.strip() for cell in rows[0][1]] if rows else []
    for column in (text_column, id_column):
        if column is not None and column not in header:
            raise FedgeError(f"{path} has no {column!r} column; its columns are: "
                             f"{', '.join(header) or 'none'}")
    texts = np.array([row[header.index(text_column)] for _, row in rows[1:]], dtype=str)
    ids = None if id_column is None else [row[header.index(id_column)].strip()
                                          for _, row in rows[1:]]
    return texts, ids


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
    its task, the class (label, target) names in output order (None: ids only), the
    decision threshold chosen for it (binary: one; multilabel: one per label; None: 0.5,
    or a task without one) and the training data's non-feature CSV columns."""

    path: Path
    session: Any
    class_names: tuple[str, ...] | None
    non_feature_columns: tuple[str, ...]
    task: str = "classification"
    threshold: tuple[float, ...] | None = None
    tokenizer: str | None = None  # a text model's (TOKENIZER_KEY)

    def token_ids(self, texts: np.ndarray) -> np.ndarray:
        """``texts`` as the model's token ids, with its own tokenizer (no torch)."""
        if self.tokenizer is None:
            raise FedgeError(f"{self.path} takes numbers, not texts: it was not trained on "
                             "text")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise FedgeError("a text model needs the tokenizers library: pip install "
                             "tokenizers (or 'fedge[text]')") from None
        encodings = Tokenizer.from_str(self.tokenizer).encode_batch([str(t) for t in texts])
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)


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
    task, threshold, task_names = _metadata_task(session, model_path)
    return Classifier(model_path, session, task_names or names, columns or (), task,
                      threshold, session.get_modelmeta().custom_metadata_map.get(TOKENIZER_KEY))


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
    if not _names(names):
        raise FedgeError(f"{model_path} has malformed {what} in its metadata "
                         f"({key}: {text[:80]!r})")
    return tuple(names)


def _names(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(n, str) for n in value)


def _metadata_task(session: Any, model_path: Path
                   ) -> tuple[str, tuple[float, ...] | None, tuple[str, ...] | None]:
    """The task, stored threshold and names under :data:`TASK_KEY`; a model exported
    before tasks has no such entry and is a classification model."""
    text = session.get_modelmeta().custom_metadata_map.get(TASK_KEY)
    if text is None:
        return "classification", None, None
    try:
        entry = json.loads(text)
    except ValueError:
        entry = None
    threshold = entry.get("threshold") if isinstance(entry, dict) else None
    names = entry.get("names") if isinstance(entry, dict) else None
    if not (isinstance(entry, dict) and entry.get("task") in TASKS
            and (threshold is None or _probabilities(threshold))
            and (names is None or _names(names))):
        raise FedgeError(f"{model_path} has a malformed task in its metadata "
                         f"({TASK_KEY}: {text[:80]!r})")
    return (entry["task"], None if threshold is None else tuple(map(float, threshold)),
            None if names is None else tuple(names))


def _probabilities(values: object) -> bool:
    """A non-empty list of thresholds, each a number strictly between 0 and 1."""
    return isinstance(values, list) and bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1 for v in values)


def parse_threshold(text: str) -> tuple[float, ...]:
    """``--threshold``: one value, or one per label separated by commas, each in (0, 1)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not _probabilities(values):
        raise FedgeError(f"--threshold must be a value between 0 and 1, or one per label "
                         f"separated by commas, not {text!r}")
    return tuple(values)


def _thresholds(classifier: Classifier, override: Sequence[float] | None, width: int
                ) -> tuple[float, ...] | None:
    """The thresholds a binary or multilabel model decides by, one per output: the
    override, else the stored ones, else 0.5; one value serves every label."""
    task, path = classifier.task, classifier.path
    if task in ("classification", "regression"):
        if override is not None:
            what = ("picks the most probable class" if task == "classification"
                    else "predicts values")
            raise FedgeError(f"{path} is a {task} model: it {what} and takes no threshold")
        return None
    chosen = override if override is not None else classifier.threshold
    if chosen is None:
        return (DEFAULT_THRESHOLD,) * width
    chosen = tuple(float(t) for t in chosen)
    if not _probabilities(list(chosen)):
        raise FedgeError(f"a threshold must lie between 0 and 1, not {list(chosen)}")
    if len(chosen) == 1:
        return chosen * width
    if len(chosen) != width:
        origin = "the threshold given" if override is not None else f"{path}'s metadata"
        raise FedgeError(f"{origin} has {len(chosen)} values, but the model has "
                         f"{width} {'labels' if task == 'multilabel' else 'outputs'}")
    return chosen


def _check_outputs(classifier: Classifier, width: int) -> None:
    """The model's output width fits its task and names."""
    names, task, path = classifier.class_names, classifier.task, classifier.path
    if task == "binary" and width != 1:
        raise FedgeError(f"{path} is a binary model but outputs {width} values, not the "
                         "positive class's one logit")
    expected = 2 if task == "binary" else width
    if names is not None and len(names) != expected:
        kind = {"multilabel": "labels", "regression": "targets"}.get(task, "classes")
        raise FedgeError(f"{path} names {len(names)} {kind} in its metadata but outputs "
                         f"{width}")


def classify(model_path: Path, inputs: Path | np.ndarray,
             label_column: str = LABEL_COLUMN, ignore_columns: Sequence[str] = (),
             threshold: Sequence[float] | None = None, id_column: str | None = None,
             text_column: str = TEXT_COLUMN) -> tuple[Inputs, Predictions]:
    """``inputs`` (samples, or a file or folder of them: :func:`read_inputs`, which also
    skips the columns the model records as no features; a text model's texts:
    :func:`text_inputs`) and the model's predictions, at ``threshold`` (binary, multilabel)
    instead of the stored one when given."""
    classifier = load_classifier(model_path)
    if classifier.tokenizer is not None:
        given = text_inputs(inputs, text_column, id_column)
    elif isinstance(inputs, np.ndarray):
        if ignore_columns or id_column is not None:
            columns = [*ignore_columns, *([id_column] if id_column else [])]
            raise FedgeError(f"the inputs are an array, not a CSV file: they have no "
                             f"columns to ignore or keep ({', '.join(columns)})")
        given = Inputs(inputs)
    else:
        given = read_inputs(Path(inputs), label_column, ignore_columns,
                            classifier.non_feature_columns, id_column)
    return given, run_model(classifier, given.samples, threshold)


def run_model(model: Path | Classifier, inputs: np.ndarray,
              threshold: Sequence[float] | None = None) -> Predictions:
    """The predictions (:class:`Predictions`) of every sample in ``inputs`` by the model's
    task; a sample that holds NaN or Inf, or values beyond float32's range, gets
    :data:`NO_PREDICTION` (a model's answer to it would be meaningless)."""
    classifier = model if isinstance(model, Classifier) else load_classifier(model)
    session, model_path = classifier.session, classifier.path
    model_input = session.get_inputs()[0]
    inputs = np.asarray(inputs)
    if inputs.dtype.kind in "UO":
        inputs = classifier.token_ids(inputs.reshape(-1))
    batch = _fit_to_model(inputs, tuple(model_input.shape[1:]))
    dtype = input_dtype(model_input)
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = batch.astype(np.float32)
    finite = np.isfinite(as_float).all(axis=tuple(range(1, batch.ndim)))
    ids = batch[finite]
    if dtype is np.int64 and not ((ids >= 0).all() and (ids % 1 == 0).all()):
        raise FedgeError("the model takes token ids: inputs must be whole numbers ≥ 0")
    width = _output_width(classifier)
    outputs = np.full((len(batch), width), np.nan, dtype=np.float32)
    if finite.any():
        feed = batch[finite].astype(np.int64) if dtype is np.int64 else as_float[finite]
        try:
            produced = session.run(None, {model_input.name: feed})[0]
        except Exception as error:  # e.g. a token id beyond the model's vocabulary
            raise FedgeError(f"onnxruntime cannot run {model_path} on these inputs: "
                             f"{error}") from error
        produced = produced.reshape(len(feed), -1)
        if produced.shape[1] != width:
            width = produced.shape[1]
            outputs = np.full((len(batch), width), np.nan, dtype=np.float32)
        outputs[finite] = produced
    _check_outputs(classifier, width)
    return _read_outputs(classifier, outputs, finite, _thresholds(classifier, threshold, width))


def _output_width(classifier: Classifier) -> int:
    """The model's outputs per sample, as its graph declares them (else as its names
    count them; the first run tells when neither does)."""
    width = classifier.session.get_outputs()[0].shape[-1]
    if isinstance(width, int):
        return width
    names = classifier.class_names or ()
    return 1 if classifier.task == "binary" else len(names)


def _read_outputs(classifier: Classifier, outputs: np.ndarray, predicted: np.ndarray,
                  threshold: tuple[float, ...] | None) -> Predictions:
    """Raw outputs in the task's terms: probabilities and the decisions they lead to."""
    task, names = classifier.task, classifier.class_names
    if task == "regression":
        return Predictions(task, outputs, None, predicted, names)
    if task == "classification":
        scores = np.full_like(outputs, np.nan)
        scores[predicted] = softmax(outputs[predicted])
        classes = np.where(predicted, np.nan_to_num(scores).argmax(axis=1), NO_PREDICTION)
        return Predictions(task, scores, classes.astype(np.int64), predicted, names)
    scores = sigmoid(outputs)
    decided = (scores >= np.asarray(threshold, dtype=np.float32)).astype(np.int64)
    decided[~predicted] = NO_PREDICTION
    if task == "binary":
        return Predictions(task, scores[:, 0], decided[:, 0], predicted, names, threshold)
    return Predictions(task, scores, decided, predicted, names, threshold)


def predict(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Predicted class id of every sample in ``inputs`` (multilabel: each label's 0/1;
    regression: the values); :data:`NO_PREDICTION` for a sample that holds NaN or Inf, or
    values beyond float32's range."""
    predictions = run_model(model_path, inputs)
    return predictions.scores if predictions.classes is None else predictions.classes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^−x) in float64, so that large logits neither overflow nor warn."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def input_dtype(model_input: object) -> type:
    """The numpy type of an onnxruntime session input: token ids or float samples."""
    return np.int64 if getattr(model_input, "type", "") == "tensor(int64)" else np.float32


# --- evaluation: labelled samples, the task's measures -----------------------------------


def default_label_column(task: str, names: Sequence[str] | None) -> str:
    """Where labels are unless told: the ``label`` column for classes, the columns named
    by the model's label (target) names for multilabel and regression, as its training
    data's were."""
    if task in ("classification", "binary") or names is None:
        return LABEL_COLUMN
    return ",".join(names)


def labelled_samples(path: Path, *, task: str, outputs: int, names: Sequence[str] | None,
                     sample_shape: tuple[int, ...], label_column: str | None = None,
                     text_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples and labels of a CSV, NPZ or image folder, as a model of ``task`` with
    ``outputs`` classes (labels, targets) named ``names`` is judged on: class ids in the
    model's order (classes are matched by name; a binary model's unnamed ids 0 and 1 are
    named "0" and "1"), 0/1 per label and values per target in the model's order. A text
    model's samples are the texts of ``text_column``."""
    from fedge.datafiles import load_labelled_data, named_binary_classes, remap_labels

    column = label_column or default_label_column(task, names)
    by_column = task in ("multilabel", "regression")
    samples = load_labelled_data(path, label_column=column,
                                 sample_shape=None if text_column else sample_shape,
                                 class_names=names if by_column else None, task=task,
                                 text_column=text_column)
    y, local_names = samples.y, samples.class_names
    if not by_column:
        if task == "binary" and names is not None:
            y, local_names = named_binary_classes(y, local_names, path)
        y = remap_labels(y, local_names, names, path)
    return samples.x, checked_labels(y, task, outputs, path)


def checked_labels(y: np.ndarray, task: str, outputs: int, source: object) -> np.ndarray:
    """Labels of ``task`` as :func:`fedge.models.measures.measures` takes them, or a
    :class:`FedgeError` saying why they do not fit the model."""
    y = np.asarray(y)
    if task in ("classification", "binary"):
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise FedgeError(f"{source} has labels of shape {y.shape} ({y.dtype}), but a "
                             f"{task} model needs one class id per sample")
        outside = y[(y < 0) | (y >= outputs)]
        if len(outside):
            raise FedgeError(f"{source} has label {int(outside[0])}, but the model has "
                             f"{outputs} classes (0..{outputs - 1})")
        return y.astype(np.int64)
    rows = y.reshape(len(y), -1) if y.ndim else y
    kind = "labels" if task == "multilabel" else "targets"
    if rows.ndim != 2 or rows.shape[1] != outputs:
        raise FedgeError(f"{source} has {rows.shape[-1] if rows.ndim else 0} {kind} per "
                         f"sample, but the model has {outputs}")
    if task == "multilabel":
        if not np.isin(rows, (0, 1)).all():
            raise FedgeError(f"{source} has multilabel labels other than 0 and 1")
        return rows.astype(np.int64)
    if rows.dtype.kind not in "iuf" or not np.isfinite(rows).all():
        raise FedgeError(f"{source} has regression targets that are not finite numbers")
    return rows.astype(np.float32)


def judged(predictions: Predictions, y: np.ndarray, where: str) -> dict:
    """The task's measures (:func:`fedge.models.measures.measures`) of ``predictions``
    against labels ``y``, at the thresholds the predictions were made with. Every sample
    needs a prediction: a measure over fewer samples than given would mislead."""
    missing = int((~predictions.predicted).sum())
    if missing:
        raise FedgeError(f"{missing} of {len(y)} samples in {where} hold NaN, Inf or values "
                         "beyond float32's range: the model cannot be judged on them")
    return measures(predictions.task, predictions.scores, y, threshold=predictions.threshold,
                    names=predictions.class_names, where=where)


def evaluate(model_path: Path, data: Path | tuple[np.ndarray, np.ndarray], *,
             label_column: str | None = None, threshold: Sequence[float] | None = None,
             text_column: str = TEXT_COLUMN) -> dict:
    """The model's task, the samples counted and the task's measures on labelled ``data``
    (a CSV, NPZ or image folder, or arrays ``(x, y)`` with labels as the task has them;
    a text model's: texts from ``text_column``), in onnxruntime alone."""
    classifier = load_classifier(model_path)
    outputs = _output_width(classifier)
    classes = 2 if classifier.task == "binary" else outputs
    if isinstance(data, tuple):
        x, where = np.asarray(data[0]), "the samples"
        y = checked_labels(np.asarray(data[1]), classifier.task, classes, "y")
    else:
        x, y = labelled_samples(Path(data), task=classifier.task, outputs=classes,
                                names=classifier.class_names,
                                sample_shape=tuple(classifier.session.get_inputs()[0].shape[1:]),
                                label_column=label_column,
                                text_column=text_column if classifier.tokenizer else None)
        where = str(data)
    if len(x) != len(y):
        raise FedgeError(f"{len(x)} samples but {len(y)} labels")
    predictions = run_model(classifier, x, threshold)
    return {"model": str(model_path), "data": where, "task": classifier.task,
            "samples": len(y), "names": None if predictions.class_names is None
            else list(predictions.class_names), **judged(predictions, y, where)}
