"""A device's own labelled samples, read from a file or folder its user supplies.

Labels depend on the task (``[task] task``):

- **classification, binary**: class ids (0, 1, 2, ...) or class names (``good``,
  ``scratch``): a CSV label column of numbers, an NPZ ``y`` of integers or image
  sub-folders named 0, 1, 2 give ids as they are; names (a CSV column of text, an NPZ
  ``y`` of strings, sub-folders named by class) get ids in sorted order,
  ``sorted(names)``: the first name is class 0. A file mixing the two is refused, and so
  are numbers that look like a quantity rather than classes: fractions, or more than
  :data:`MAX_CLASS_IDS` distinct integers (name the classes instead, or use
  ``--task regression``). A binary task's two classes become 0/1 later
  (:func:`binary_labels`), once its positive class is known.
- **multilabel**: an int64 0/1 matrix, one column per label: several CSV columns of 0/1
  (``label_column`` names them, comma-separated), or one column whose text lists a
  sample's labels separated by ``;`` (empty: none), an NPZ ``y`` matrix, or image
  sub-folders named by their labels, ``;``-separated (``none``: no label).
- **regression**: float32 targets, one column per target: one or several numeric CSV
  columns, or an NPZ ``y`` of shape (n,) or (n, T).
"""

import csv
import math
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.errors import FedgeError

LABEL_COLUMN = "label"  # the CSV column that holds labels, unless told otherwise
TEXT_COLUMN = "text"  # the CSV column that holds a text model's input, unless told otherwise

FLOAT32_MAX = float(np.finfo(np.float32).max)  # samples are float32 tensors
MAX_CLASS_ID = 2**31 - 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED = ("a .csv file with a header row, an .npz file with arrays x and y, "
             "or a folder with one sub-folder of images per class")
MAX_LISTED = 10  # class names listed in an error message
# More distinct integer labels than this are a measured quantity, not class ids: such
# a label column is refused for classification (classes that many are named instead).
MAX_CLASS_IDS = 100
LABEL_SEPARATOR = ";"  # multilabel: the labels of one sample in one CSV cell or folder name
NO_LABEL_FOLDER = "none"  # multilabel: the image sub-folder of samples without a label


@dataclass(frozen=True)
class LabelledSamples:
    """Samples ``x``, their labels ``y`` as the task has them (class ids, int64 (n,); a
    multilabel 0/1 matrix, int64 (n, L); regression targets, float32 (n, T)), the names
    of the classes in id order, of the labels or of the targets in column order (None
    when unnamed), and each sample's group (the values of a CSV ``group_column``, as
    text; None without one)."""

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...] | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise FedgeError(f"{len(self.x)} samples but {len(self.y)} labels")
        if self.groups is not None and len(self.groups) != len(self.y):
            raise FedgeError(f"{len(self.y)} samples but {len(self.groups)} group values")
        if self.class_names is not None:
            names = tuple(self.class_names)
            if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
                raise FedgeError(f"class names must be distinct strings, not {list(names)}")
            object.__setattr__(self, "class_names", names)


def load_labelled_data(path: Path, *, label_column: str = LABEL_COLUMN,
                       sample_shape: tuple[int, ...] | None = None,
                       class_names: Sequence[str] | None = None,
                       group_column: str | None = None,
                       task: str = "classification",
                       text_column: str | None = None) -> LabelledSamples:
    """Samples and labels from a CSV, an NPZ, or an image folder, as ``task`` has them.

    ``sample_shape`` is the shape the model takes, so that flat CSV rows of 64 pixels can
    feed a model of (1, 8, 8) images. Without ``class_names`` named classes get ids in
    sorted order and come back as ``class_names``; with it (the federation's names, in
    id order; a multilabel or regression task's label or target names) every name must
    be one of them and gets its place there. ``group_column`` (CSV only) is a column
    that is no feature: its values become ``groups``. ``label_column`` may name several
    columns, comma-separated, for a multilabel or regression task.
    """
    path = Path(path)
    columns = label_columns(label_column, task)
    if group_column is not None and (path.is_dir() or path.suffix.lower() != ".csv"):
        raise FedgeError(f"{path} is not a .csv file, so it has no column {group_column!r} "
                         "to group its samples by")
    groups, names_of_columns = None, None
    if text_column is not None and (path.is_dir() or path.suffix.lower()
                                    not in (".csv", ".npz")):
        raise FedgeError(f"cannot read texts from {path}: a text model reads a .csv file "
                         f"with a {text_column!r} column, or an .npz file whose x holds "
                         "strings")
    if path.is_dir():
        x, labels = _read_image_folder(path, task)
    elif not path.exists():
        raise FedgeError(f"no such file or folder: {path}")
    elif path.suffix.lower() == ".csv" and text_column is not None:
        x, labels, groups = _read_text_csv(path, text_column, columns, group_column, task)
        names_of_columns = columns
    elif path.suffix.lower() == ".csv":
        x, labels, groups = _read_csv(path, columns, group_column, task)
        names_of_columns = columns
    elif path.suffix.lower() == ".npz":
        x, labels = _read_npz(path, texts=text_column is not None)
    else:
        raise FedgeError(f"cannot read {path}: use {SUPPORTED}")
    if len(labels) == 0:
        raise FedgeError(f"{path} holds no samples")
    y, names = task_labels(labels, path, task, class_names, names_of_columns)
    x = x if sample_shape is None else _reshaped(x, tuple(sample_shape), path)
    return LabelledSamples(x, y, names, groups)


def label_columns(label_column: str, task: str = "classification") -> tuple[str, ...]:
    """The CSV columns ``label_column`` names: one, or for a multilabel or regression
    task several, comma-separated."""
    columns = tuple(name.strip() for name in label_column.split(","))
    if not all(columns) or len(set(columns)) != len(columns):
        raise FedgeError(f"label column {label_column!r} must name distinct columns, "
                         "comma-separated")
    if len(columns) > 1 and task in ("classification", "binary"):
        raise FedgeError(f"label column {label_column!r} names {len(columns)} columns, but "
                         f"a {task} task has one label per sample; several label columns "
                         "are for --task multilabel (0/1 columns) or --task regression")
    return columns


def task_labels(labels: np.ndarray, source: object, task: str,
                class_names: Sequence[str] | None = None,
                column_names: Sequence[str] | None = None
                ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Labels as ``task`` has them (see :class:`LabelledSamples`) and their names.

    ``labels``: one value per sample (numbers, or text), or one row per sample (several
    CSV columns, named ``column_names``, or an NPZ matrix). ``class_names``: the
    federation's names, whose order the result takes."""
    labels = np.asarray(labels)
    if task in ("classification", "binary"):
        if labels.ndim != 1:
            raise FedgeError(f"{source} has labels of shape {labels.shape[1:]} per sample, "
                             f"but a {task} task has one class per sample (several 0/1 "
                             "labels are --task multilabel, numeric targets --task "
                             "regression)")
        return labels_to_ids(labels, source, class_names)
    if task == "multilabel":
        y, names = _multilabel(labels, source, column_names)
    else:
        y, names = _regression(labels, source, column_names)
    if class_names is None:
        return y, names
    if names is None and y.shape[1] != len(class_names):
        raise FedgeError(f"{source} has {y.shape[1]} {_kind(y)}s per sample, but the "
                         f"federation has {len(class_names)}: {_listed(class_names)}")
    return remap_labels(y, names, class_names, source), tuple(class_names)


def _kind(y: np.ndarray) -> str:
    """What a column of a label matrix is: a multilabel task's label, a regression's
    target."""
    return "target" if y.dtype.kind == "f" else "label"


def _multilabel(labels: np.ndarray, source: object, column_names: Sequence[str] | None
                ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A 0/1 matrix from 0/1 columns, or from text listing each sample's labels."""
    if labels.dtype.kind == "U":
        if labels.ndim != 1:
            raise FedgeError(f"{source} has text labels of shape {labels.shape[1:]} per "
                             f"sample; list a sample's labels in one value, separated by "
                             f"{LABEL_SEPARATOR!r}")
        return _labels_from_text(labels)
    if labels.dtype.kind not in "iufb" or labels.ndim not in (1, 2):
        raise FedgeError(f"a multilabel task needs 0/1 labels, one column per label, but "
                         f"{source} has {labels.dtype} labels of shape {labels.shape}")
    matrix = labels.reshape(len(labels), -1)
    binary = (matrix == 0) | (matrix == 1)
    if not binary.all():
        raise FedgeError(f"{source} has label {matrix[~binary][0]:g}, but a multilabel task "
                         "takes 0 or 1 per label (one column per label)")
    names = None if column_names is None else tuple(column_names)
    return matrix.astype(np.int64), names


def _labels_from_text(texts: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each sample's ``;``-separated label names as one row of 0/1; the names sorted."""
    combinations, where = np.unique(texts, return_inverse=True)  # few: cheap in Python
    sets = [{name.strip() for name in str(text).split(LABEL_SEPARATOR)} - {""}
            for text in combinations]
    names = tuple(sorted(set().union(*sets)))
    index = {name: i for i, name in enumerate(names)}
    rows = np.zeros((len(combinations), len(names)), dtype=np.int64)
    for row, members in zip(rows, sets, strict=True):
        row[[index[name] for name in members]] = 1
    return rows[where.reshape(-1)], names


def _regression(labels: np.ndarray, source: object, column_names: Sequence[str] | None
                ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Targets as float32, one column per target, refused unless finite numbers."""
    if labels.dtype.kind not in "iuf" or labels.ndim not in (1, 2):
        example = f" (e.g. {labels.reshape(-1)[0]!r})" if labels.dtype.kind == "U" else ""
        raise FedgeError(f"a regression task needs numeric targets, but {source} has "
                         f"{labels.dtype} labels{example}")
    with np.errstate(over="ignore"):
        targets = labels.reshape(len(labels), -1).astype(np.float32)
    finite = np.isfinite(targets)
    if not finite.all():
        raise FedgeError(f"{source} has target {labels.reshape(len(labels), -1)[~finite][0]:g};"
                         f" targets must be finite numbers within ±{FLOAT32_MAX:.3g}")
    names = None if column_names is None else tuple(column_names)
    return targets, names


def labels_to_ids(labels: np.ndarray, source: object,
                  class_names: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Class ids (int64) and the names they stand for, from labels that are either ids
    (numbers) or names (strings; ids in sorted order, or in ``class_names``' order)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "US":
        if labels.dtype.kind == "S":
            raise FedgeError(f"labels in {source} are bytes ({labels.dtype}); give class "
                             "names as text (str)")
        return _named_ids(labels, source, class_names)
    ids = _class_ids(labels, source)
    if class_names is not None and len(ids) and int(ids.max()) >= len(class_names):
        raise FedgeError(f"{source} has label {int(ids.max())}, but there are only "
                         f"{len(class_names)} classes: {_listed(class_names)}")
    return ids, None if class_names is None else tuple(class_names)


def remap_labels(y: np.ndarray, local_names: Sequence[str] | None,
                 federation_names: Sequence[str] | None, source: object) -> np.ndarray:
    """A device's labels ``y``, named by ``local_names``, as the federation's
    ``federation_names`` name them: class ids (which index ``local_names``, its own names
    in id order: sorted, as its files define them) as the federation's ids; a label
    matrix (multilabel 0/1, regression targets: one column per name) with its columns in
    the federation's order.

    A device may lack some of the federation's classes, and labels (their column is 0),
    but never a target. Unnamed labels (``local_names`` None) come back as they are; named
    labels need a federation whose classes are named, and every name must be among them.
    """
    y = np.asarray(y)
    if local_names is None:
        return y if y.ndim == 2 else y.astype(np.int64)
    if federation_names is None:
        raise FedgeError(f"{source} names its classes ({_listed(local_names)}), but the "
                         "federation's classes have no names, only ids 0, 1, 2, ...: label "
                         "the samples by class id")
    index = {name: i for i, name in enumerate(federation_names)}
    unknown = [name for name in local_names if name not in index]
    if unknown:
        raise FedgeError(f"{source} has {_classes(unknown)} the federation does not know: "
                         f"{_listed(unknown)}; the federation's classes are: "
                         f"{_listed(federation_names)}")
    if y.ndim == 2:
        return _reordered_columns(y, tuple(local_names), tuple(federation_names), source)
    y = y.astype(np.int64)
    if len(y) and not (int(y.min()) >= 0 and int(y.max()) < len(local_names)):
        raise FedgeError(f"{source} has class id {int(y.max())}, but only "
                         f"{len(local_names)} class names")
    return np.array([index[name] for name in local_names], dtype=np.int64)[y]


def _reordered_columns(y: np.ndarray, local_names: tuple[str, ...],
                       federation_names: tuple[str, ...], source: object) -> np.ndarray:
    """A label matrix's columns in the federation's order: a label the device never has
    is 0 for all its samples; a target it lacks cannot be made up."""
    if y.shape[1] != len(local_names):
        raise FedgeError(f"{source} has {y.shape[1]} {_kind(y)}s per sample but "
                         f"{len(local_names)} names: {_listed(local_names)}")
    if local_names == federation_names:
        return y
    lacking = [name for name in federation_names if name not in local_names]
    if lacking and y.dtype.kind == "f":
        raise FedgeError(f"{source} has no target {_listed(lacking)}; the federation's "
                         f"model predicts: {_listed(federation_names)}")
    reordered = np.zeros((len(y), len(federation_names)), dtype=y.dtype)
    where = {name: i for i, name in enumerate(local_names)}
    for k, name in enumerate(federation_names):
        if name in where:
            reordered[:, k] = y[:, where[name]]
    return reordered


def united_class_names(parts: Sequence[tuple[LabelledSamples, object]],
                       order: Sequence[str] | None = None
                       ) -> tuple[tuple[str, ...] | None, list[np.ndarray]]:
    """The class (label, target) names of several files together: their names when all
    give the same in the same order (the label columns a CSV's ``label_column`` names),
    else ``sorted()`` over all of them; or ``order``, which must hold every name. And each
    part's labels as labels of those names.

    ``parts`` pairs samples with where they came from, for messages; all must name their
    classes, or none."""
    named = [source for samples, source in parts if samples.class_names is not None]
    if not named:
        _same_label_shape(parts)
        return None, [samples.y for samples, _ in parts]
    if len(named) < len(parts):
        unnamed = next(source for samples, source in parts if samples.class_names is None)
        raise FedgeError(f"{named[0]} labels its classes by name but {unnamed} by id; label "
                         "every file's samples the same way")
    every = {samples.class_names for samples, _ in parts}
    if order is not None:
        names = tuple(order)
    elif len(every) == 1:
        names = every.pop()
    else:
        names = tuple(sorted({name for samples, _ in parts for name in samples.class_names}))
    return names, [remap_labels(samples.y, samples.class_names, names, source)
                   for samples, source in parts]


def _same_label_shape(parts: Sequence[tuple[LabelledSamples, object]]) -> None:
    """Unnamed label matrices (an NPZ's) of one width in every file."""
    first, where = parts[0]
    for samples, source in parts[1:]:
        if samples.y.shape[1:] != first.y.shape[1:]:
            raise FedgeError(f"{source} has labels of shape {samples.y.shape[1:]} per sample "
                             f"but {where} {first.y.shape[1:]}; every file must label its "
                             "samples alike")


def count_classes(names: Sequence[str] | None, labels: Sequence[np.ndarray]) -> int:
    """The classes ``labels`` stand for: the names' number, else the largest class id
    seen + 1; the labels (multilabel) or targets (regression) of a label matrix."""
    if names:
        return len(names)
    if labels[0].ndim == 2:
        return labels[0].shape[1]
    return int(max(int(y.max()) for y in labels if len(y))) + 1


def binary_labels(parts: Sequence[np.ndarray], class_names: Sequence[str] | None,
                  positive: str | None, reference: np.ndarray, source: object
                  ) -> tuple[list[np.ndarray], tuple[str, str]]:
    """A binary task's class ids as 0/1, 1 for the positive class, and the two classes'
    names (negative, positive).

    ``parts`` hold class ids of ``class_names`` (unnamed ids: named by their number, so
    that ids 0 and 1 are "0" and "1"); together they must have exactly 2 classes.
    ``positive`` names the positive class, by name or by id; by default it is the
    rarest class in ``reference`` (the later one on a tie: 1 of balanced ids 0 and 1),
    the class a detector is usually for."""
    if class_names is None:
        ids = np.unique(np.concatenate([np.asarray(y).reshape(-1) for y in parts]))
        names = [str(i) for i in ids]
    else:
        ids, names = np.arange(len(class_names)), list(class_names)
    if len(ids) != 2:
        raise FedgeError(f"binary needs 2 classes; {source} has {len(ids)}: {_listed(names)}")
    chosen = (_named_positive(positive, ids, names) if positive is not None
              else _rarest(ids, np.asarray(reference)))
    negative = 1 - chosen
    return ([(np.asarray(y) == ids[chosen]).astype(np.int64) for y in parts],
            (names[negative], names[chosen]))


def _named_positive(positive: str, ids: np.ndarray, names: list[str]) -> int:
    """Which of the two classes ``positive`` names: by name first, then by id."""
    text = positive.strip()
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) in ids.tolist():
        return ids.tolist().index(int(text))
    raise FedgeError(f"positive class {positive!r} is neither of the 2 classes: "
                     f"{_listed(names)}")


def _rarest(ids: np.ndarray, reference: np.ndarray) -> int:
    counts = [int((reference == i).sum()) for i in ids]
    return 0 if counts[0] < counts[1] else 1


def named_binary_classes(y: np.ndarray, class_names: Sequence[str] | None, source: object
                         ) -> tuple[np.ndarray, tuple[str, ...]]:
    """A device's classes for a binary task, by name: unnamed ids get their number as
    name ("0", "1"), so that the federation's (negative, positive) names map them to 0/1
    whichever class is positive. A device may hold one class, never more than 2."""
    if class_names is None:
        present, inverse = np.unique(np.asarray(y, dtype=np.int64), return_inverse=True)
        y, class_names = inverse.reshape(-1), tuple(str(i) for i in present)
    if len(class_names) > 2:
        raise FedgeError(f"binary needs 2 classes; {source} has {len(class_names)}: "
                         f"{_listed(class_names)}")
    return y, tuple(class_names)


def _classes(names: Sequence[str]) -> str:
    return "a class" if len(names) == 1 else f"{len(names)} classes"


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def _named_ids(labels: np.ndarray, source: object, class_names: Sequence[str] | None
               ) -> tuple[np.ndarray, tuple[str, ...]]:
    if (labels == "").any():
        raise FedgeError(f"{source} has an empty label (sample {int(np.argmax(labels == ''))}, "
                         "counting from 0); every sample needs a class")
    present, inverse = np.unique(labels, return_inverse=True)  # sorted, as sorted() sorts
    present = [str(name) for name in present]
    if class_names is None:
        return inverse.astype(np.int64).reshape(-1), tuple(present)
    local = remap_labels(inverse.reshape(-1), present, tuple(class_names), source)
    return local, tuple(class_names)


def _reshaped(x: np.ndarray, sample_shape: tuple[int, ...], path: Path) -> np.ndarray:
    if math.prod(x.shape[1:]) != math.prod(sample_shape):
        raise FedgeError(f"samples in {path} have shape {x.shape[1:]}, "
                         f"but the model expects samples of shape {sample_shape}")
    return x.reshape(len(x), *sample_shape)


def _class_ids(labels: np.ndarray, path: object) -> np.ndarray:
    """Labels as int64 class ids. A fraction or a negative label is a data error, never
    rounded away; so are more than :data:`MAX_CLASS_IDS` distinct integers, which are a
    quantity (a price, an age) far more often than classes."""
    if labels.dtype.kind not in "iuf":
        raise FedgeError(f"labels in {path} must be integer class ids or class names, not "
                         f"{labels.dtype}")
    valid = (np.isfinite(labels) & (labels >= 0) & (np.floor(labels) == labels)
             & (labels <= MAX_CLASS_ID))
    if not valid.all():
        raise FedgeError(f"{path} has label {labels[~valid][0]:g}, "
                         "but labels must be integer class ids 0, 1, 2, ... (or class names); "
                         "for numeric targets use --task regression")
    ids = labels.astype(np.int64)
    distinct = np.unique(ids)
    if len(distinct) > MAX_CLASS_IDS:
        raise FedgeError(f"{path} has {len(distinct)} distinct integer labels "
                         f"({_listed(str(i) for i in distinct[:3])}, ...), more than "
                         f"{MAX_CLASS_IDS} classes: for numeric targets use --task "
                         "regression; for that many classes label them by name")
    return ids


def _numeric_labels(task: str, columns: Sequence[str]) -> bool:
    """Whether a CSV's label columns are read as numbers like its features: regression's
    targets, and several 0/1 columns of a multilabel task; otherwise one column is read
    as text (class ids, class names, ``;``-separated label names)."""
    return task == "regression" or (task == "multilabel" and len(columns) > 1)


def _read_csv(path: Path, columns: Sequence[str], group_column: str | None, task: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    header = _csv_header(path)
    for column in (*columns, group_column):
        if column is not None and column not in header:
            raise FedgeError(f"{path} has no {column!r} column; "
                             f"its columns are: {', '.join(header)}")
    if group_column in columns:
        raise FedgeError(f"column {group_column!r} of {path} cannot be both the "
                         "label and the group of a sample")
    special = [*columns, *([] if group_column is None else [group_column])]
    features = [i for i, name in enumerate(header) if name not in special]
    if not features:
        raise FedgeError(f"{path} has no feature columns besides "
                         f"{' and '.join(repr(c) for c in special)}")
    numeric = _numeric_labels(task, columns)
    text_columns = [header.index(c) for c in special if not (numeric and c in columns)]
    try:
        table = read_numbers(path, 1, len(header), text_columns, np.float32)
        texts = (np.char.strip(_read_texts(path, 1, text_columns)) if text_columns
                 else np.zeros((len(table), 0), str))
    except (ValueError, UnicodeDecodeError) as error:
        _explain_csv(path, header, columns, group_column, task)
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    x = table[:, features]
    labels = (table[:, [header.index(c) for c in columns]] if numeric
              else _csv_labels(texts[:, 0], empty_is_no_label=task == "multilabel"))
    groups = None if group_column is None else texts[:, -1]
    if (labels is None or not np.isfinite(x).all()
            or (numeric and not np.isfinite(labels).all())
            or (groups is not None and (groups == "").any())):
        _explain_csv(path, header, columns, group_column, task)
        raise FedgeError(f"{path} holds a value that is not a finite float32 number")
    return x, labels, groups


def _read_text_csv(path: Path, text_column: str, columns: Sequence[str],
                   group_column: str | None, task: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A CSV of texts: Python's csv reader, for quoted cells with commas and line breaks
    (a text data set is small next to a table of numbers)."""
    header = _csv_header(path)
    for column in (text_column, *columns, group_column):
        if column is not None and column not in header:
            raise FedgeError(f"{path} has no {column!r} column; "
                             f"its columns are: {', '.join(header)}")
    if text_column in (*columns, group_column):
        raise FedgeError(f"column {text_column!r} of {path} cannot be both the text and the "
                         "label or group of a sample")
    at = {name: header.index(name) for name in (text_column, *columns, group_column)
          if name is not None}
    texts, labels, groups = [], [], []
    numeric = _numeric_labels(task, columns)
    try:
        for line, row in csv_rows(path, 1):
            _check_width(row, len(header), line, path)
            texts.append(row[at[text_column]])
            labels.append([_number(row[at[c]], c, line, path) if numeric else row[at[c]].strip()
                           for c in columns])
            if group_column is not None:
                _group(row[at[group_column]], group_column, line, path)
                groups.append(row[at[group_column]].strip())
    except (csv.Error, UnicodeDecodeError) as error:
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    table = np.array(labels, dtype=np.float32 if numeric else str).reshape(len(texts), -1)
    y = table if numeric else _csv_labels(table[:, 0], empty_is_no_label=task == "multilabel")
    if y is None:
        _explain_csv_labels(path, table[:, 0])
    return (np.array(texts, dtype=str), y,
            None if group_column is None else np.array(groups, dtype=str))


def _explain_csv_labels(path: Path, labels: np.ndarray) -> None:
    empty = np.flatnonzero(labels == "")
    if empty.size:
        raise FedgeError(f"sample {int(empty[0]) + 1} of {path} has no label")
    raise FedgeError(f"{path} mixes class ids and class names in its label column; use one "
                     "or the other")


def _csv_header(path: Path) -> list[str]:
    """The names in the first row of a CSV file (a header it must have), stripped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            header = [name.strip() for name in next(csv.reader(file), [])]
    except UnicodeDecodeError:
        raise FedgeError(f"{path} is not a UTF-8 text file; a CSV must be") from None
    except csv.Error as error:
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    if not header:
        raise FedgeError(f"{path} is empty; it needs a header row naming its columns")
    return header


# CSV as Python's csv module reads it: quoted cells, no comment lines, UTF-8.
_CSV_DIALECT = {"delimiter": ",", "quotechar": '"', "comments": None, "encoding": "utf-8"}


def read_numbers(path: Path, skip_lines: int, width: int, text_columns: Sequence[int],
                 dtype: type) -> np.ndarray:
    """The rows of a CSV file after its first ``skip_lines`` lines as one ``dtype`` array
    of ``width`` columns, ``text_columns`` as NaN. numpy's reader holds neither the text
    nor a Python object per value, only the growing array. ValueError for a row of another
    width or a cell that is not a number (:func:`csv_rows` finds which)."""
    converters = {i: _not_read for i in text_columns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no rows: the caller says so
        table = np.loadtxt(path, dtype=dtype, skiprows=skip_lines, ndmin=2,
                           converters=converters or None, **_CSV_DIALECT)
    if not len(table):
        return np.zeros((0, width), dtype)
    if table.shape[1] != width:
        raise ValueError(f"rows have {table.shape[1]} values, but {width} were expected")
    return table


def _read_texts(path: Path, skip_lines: int, columns: Sequence[int]) -> np.ndarray:
    """``columns`` of a CSV file's rows after its first ``skip_lines`` lines, as text:
    one numpy string array, no Python object per cell."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        texts = np.loadtxt(path, dtype=str, skiprows=skip_lines, usecols=columns, ndmin=2,
                           **_CSV_DIALECT)
    return texts if len(texts) else np.zeros((0, len(columns)), str)


def _not_read(text: str) -> float:
    return math.nan


def csv_rows(path: Path, skip_lines: int) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows after the first ``skip_lines`` lines of a CSV file with their
    line numbers, one at a time: to find the line a fast reader refused."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        for row in reader:
            if reader.line_num > skip_lines and row:
                yield reader.line_num, row


def _explain_csv(path: Path, header: list[str], columns: Sequence[str],
                 group_column: str | None, task: str) -> None:
    """Raise the first problem of a CSV file of labelled samples, naming its line and
    column; return if there is none. Reads one row at a time."""
    numeric = _numeric_labels(task, columns)
    label_at = [header.index(column) for column in columns]
    group_at = None if group_column is None else header.index(group_column)
    features = [i for i, name in enumerate(header) if name not in (*columns, group_column)]
    number = named = bad_number = empty = None  # (line, label) of the first such label
    try:
        for line, row in csv_rows(path, 1):
            _check_width(row, len(header), line, path)
            for i in features:
                _number(row[i], header[i], line, path)
            if group_at is not None:
                _group(row[group_at], group_column, line, path)
            if numeric:
                for i in label_at:
                    _has_label(row[i], header[i], line, path)
                    _number(row[i], header[i], line, path)
                continue
            if task != "multilabel":
                _has_label(row[label_at[0]], columns[0], line, path)
            label = row[label_at[0]].strip()
            if not label:  # multilabel: no label, unless the column holds 0/1
                empty = empty or line
            elif is_number(label):
                number = number or (line, label)
                if not abs(float(label)) <= FLOAT32_MAX:
                    bad_number = bad_number or (line, label)
            else:
                named = named or (line, label)
            if number and named and task != "multilabel":
                raise FedgeError(f"column {columns[0]!r} of {path} mixes class ids and "
                                 f"class names (line {number[0]} holds {number[1]!r}, line "
                                 f"{named[0]} {named[1]!r}); label every sample by id or "
                                 "every sample by name")
    except UnicodeDecodeError:
        raise FedgeError(f"{path} is not a UTF-8 text file; a CSV must be") from None
    except csv.Error as error:
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    if named:  # names (multilabel: with samples of no label): nothing is wrong
        return
    if empty:  # multilabel numbers: 0 or 1, never missing
        _has_label("", columns[0], empty, path)
    if bad_number:
        line, label = bad_number
        _number(label, columns[0], line, path)


def _has_label(text: str, column: str, line: int, path: Path) -> None:
    if not text.strip():
        raise FedgeError(f"line {line} of {path} has no label in column {column!r}")


def _check_width(row: list[str], width: int, line: int, path: Path) -> None:
    if len(row) != width:
        raise FedgeError(f"line {line} of {path} has {len(row)} values, "
                         f"but the header names {width} columns")


def _group(text: str, column: str, line: int, path: Path) -> None:
    if not text.strip():
        raise FedgeError(f"line {line} of {path} has no value in column {column!r}, "
                         "which groups the samples")


def _csv_labels(labels: np.ndarray, empty_is_no_label: bool = False) -> np.ndarray | None:
    """Numbers when every label is a finite number (class ids), text when none is a
    number (class names); None for an empty label, a mix, or a number beyond float32.
    ``empty_is_no_label`` (multilabel): any text makes the column text, names of labels
    with empty cells for samples without one."""
    names, where = np.unique(labels, return_inverse=True)  # few distinct labels: cheap
    numbers = [float(name) if is_number(name) else None for name in names]
    texts = [name for name, number in zip(names, numbers, strict=True)
             if number is None and name != ""]
    if texts and (empty_is_no_label or len(texts) == len(names)):
        return labels
    if texts or "" in names.tolist() or any(not abs(n) <= FLOAT32_MAX for n in numbers):
        return None
    return np.array(numbers, dtype=np.float64)[where.reshape(-1)]


def is_number(text: str) -> bool:
    """Whether ``float()`` reads ``text`` (NaN and Inf included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, column: str, line: int, path: Path) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FedgeError(f"line {line} of {path} holds {text!r} in column {column!r}, "
                         "which is not a number") from None
    if not abs(value) <= FLOAT32_MAX:  # float() reads "nan" and "inf" too
        within = f" within ±{FLOAT32_MAX:.3g}" if math.isfinite(value) else ""
        raise FedgeError(f"line {line} of {path} holds {text.strip()!r} in column "
                         f"{column!r}; values must be finite numbers{within}")
    return value


def _read_npz(path: Path, texts: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise FedgeError(f"{path} is not an .npz archive; write one with numpy.savez(path, x=, y=)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in ("x", "y") if key not in arrays.files]
            if missing:
                raise FedgeError(f"{path} has no array {missing[0]!r}; "
                                 f"its arrays are: {', '.join(arrays.files) or 'none'}")
            x, y = arrays["x"], arrays["y"]
    except ValueError as error:  # e.g. object arrays, which only (unsafe) pickle restores
        raise FedgeError(f"cannot read {path}: {error}") from error
    if x.ndim == 0 or y.ndim not in (1, 2) or len(x) != len(y):
        raise FedgeError(f"{path} has x of shape {x.shape} and y of shape {y.shape}, "
                         "but needs one row of x and one label (or one row of labels) in "
                         "y per sample")
    if texts:
        if x.ndim != 1 or x.dtype.kind != "U":
            raise FedgeError(f"x in {path} must hold one string per sample for a text "
                             f"model, not {x.dtype} of shape {x.shape}")
        return x, y
    return as_samples(x, f"x in {path}"), y


def as_samples(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as model inputs: integers as int64 token ids (text models embed rather than
    scale them), anything else numeric as float32, refused if not finite."""
    if x.dtype.kind in "iu":
        return x.astype(np.int64)
    if x.dtype.kind not in "fb":
        raise FedgeError(f"{where} must be numeric, not {x.dtype}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes Inf, refused below
        x = x.astype(np.float32)
    finite = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if not finite.all():
        raise FedgeError(f"{where} holds NaN, Inf or values beyond float32's range in "
                         f"{int((~finite).sum())} samples (the first is sample "
                         f"{int(np.argmin(finite))}); values must be finite numbers")
    return x


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def is_image(path: Path) -> bool:
    """A visible file with an image suffix that fedge reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES and _visible(path) and path.is_file()


def _read_image_folder(root: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and their labels: the class (its id or name) of each sub-folder, or for a
    multilabel task its ``;``-separated label names (``none``: no label)."""
    if task == "regression":
        raise FedgeError(f"{root} is an image folder, whose sub-folders name classes: a "
                         "regression task needs numeric targets, in a CSV or an NPZ file")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise FedgeError(f"{root} has no class sub-folders; put each class's images "
                         "in a sub-folder of its own")
    by_id = [] if task == "multilabel" else [f for f in folders
                                             if f.name.isascii() and f.name.isdigit()]
    if by_id and len(by_id) < len(folders):
        named = next(f for f in folders if f not in by_id)
        raise FedgeError(f"the class sub-folders of {root} mix class ids and class names "
                         f"({by_id[0].name}, {named.name}); name every class folder by id "
                         "or every one by name")
    files = [(file, folder) for folder in folders for file in sorted(folder.iterdir())
             if is_image(file)]
    if not files:
        raise FedgeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the sub-folders of {root}")
    images = stack_images([file for file, _ in files], root)
    if by_id:
        return images, np.array([int(f.name) for _, f in files], dtype=np.int64)
    names = ["" if task == "multilabel" and f.name == NO_LABEL_FOLDER else f.name
             for _, f in files]
    return images, np.array(names, dtype=str)


def stack_images(files: Sequence[Path], root: Path) -> np.ndarray:
    """The images ``files`` (all of one size and mode) as one float32 batch."""
    images = [read_image(file) for file in files]
    for file, image in zip(files, images, strict=True):
        if image.shape != images[0].shape:
            raise FedgeError(f"images in {root} must share one size and mode, but {file} has "
                             f"shape {image.shape} and {files[0]} {images[0].shape}")
    return np.stack(images)


def read_image(file: Path) -> np.ndarray:
    """Raw 0..255 pixels as float32, channels first: scaling is the model's job."""
    from PIL import Image  # only image folders need Pillow; keep client start-up light

    try:
        with Image.open(file) as image:
            pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"),
                                dtype=np.float32)
    except OSError as error:
        raise FedgeError(f"{file} is not a readable image") from error
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
