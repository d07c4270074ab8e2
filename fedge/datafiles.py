"""A device's own labelled samples, read from a file or folder its user supplies.

Labels are class ids (0, 1, 2, ...) or class names (``good``, ``scratch``): a CSV label
column of numbers, an NPZ ``y`` of integers or image sub-folders named 0, 1, 2 give ids
as they are; names (a CSV column of text, an NPZ ``y`` of strings, sub-folders named by
class) get ids in sorted order, ``sorted(names)``: the first name is class 0. A file
mixing the two is refused.
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

FLOAT32_MAX = float(np.finfo(np.float32).max)  # samples are float32 tensors
MAX_CLASS_ID = 2**31 - 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED = ("a .csv file with a header row, an .npz file with arrays x and y, "
             "or a folder with one sub-folder of images per class")
MAX_LISTED = 10  # class names listed in an error message


@dataclass(frozen=True)
class LabelledSamples:
    """Samples ``x``, their class ids ``y`` (int64), the names those ids stand for in id
    order (None when the data labels classes by id), and each sample's group (the values
    of a CSV ``group_column``, as text; None without one)."""

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
                       group_column: str | None = None) -> LabelledSamples:
    """Samples and labels from a CSV, an NPZ, or an image folder.

    ``sample_shape`` is the shape the model takes, so that flat CSV rows of 64 pixels can
    feed a model of (1, 8, 8) images. Without ``class_names`` named classes get ids in
    sorted order and come back as ``class_names``; with it (the federation's names, in
    id order) every name must be one of them and gets its id there. ``group_column``
    (CSV only) is a column that is no feature: its values become ``groups``.
    """
    path = Path(path)
    if group_column is not None and (path.is_dir() or path.suffix.lower() != ".csv"):
        raise FedgeError(f"{path} is not a .csv file, so it has no column {group_column!r} "
                         "to group its samples by")
    groups = None
    if path.is_dir():
        x, labels = _read_image_folder(path)
    elif not path.exists():
        raise FedgeError(f"no such file or folder: {path}")
    elif path.suffix.lower() == ".csv":
        x, labels, groups = _read_csv(path, label_column, group_column)
    elif path.suffix.lower() == ".npz":
        x, labels = _read_npz(path)
    else:
        raise FedgeError(f"cannot read {path}: use {SUPPORTED}")
    if len(labels) == 0:
        raise FedgeError(f"{path} holds no samples")
    y, names = labels_to_ids(labels, path, class_names)
    x = x if sample_shape is None else _reshaped(x, tuple(sample_shape), path)
    return LabelledSamples(x, y, names, groups)


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
    """A device's class ids ``y``, which index ``local_names`` (its own names in id order:
    sorted, as its files define them), as ids of the federation's ``federation_names``.

    A device may lack some of the federation's classes. Unnamed labels (``local_names``
    None) are class ids already and come back as they are; named labels need a federation
    whose classes are named, and every name must be among them.
    """
    y = np.asarray(y, dtype=np.int64)
    if local_names is None:
        return y
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
    if len(y) and not (int(y.min()) >= 0 and int(y.max()) < len(local_names)):
        raise FedgeError(f"{source} has class id {int(y.max())}, but only "
                         f"{len(local_names)} class names")
    return np.array([index[name] for name in local_names], dtype=np.int64)[y]


def united_class_names(parts: Sequence[tuple[LabelledSamples, object]],
                       order: Sequence[str] | None = None
                       ) -> tuple[tuple[str, ...] | None, list[np.ndarray]]:
    """The class names of several files together, ``sorted()`` over all of them (or
    ``order``, which must hold every name), and each part's ids as ids of those names.

    ``parts`` pairs samples with where they came from, for messages; all must name their
    classes, or none."""
    named = [source for samples, source in parts if samples.class_names is not None]
    if not named:
        return None, [samples.y for samples, _ in parts]
    if len(named) < len(parts):
        unnamed = next(source for samples, source in parts if samples.class_names is None)
        raise FedgeError(f"{named[0]} labels its classes by name but {unnamed} by id; label "
                         "every file's samples the same way")
    names = tuple(order) if order is not None else tuple(
        sorted({name for samples, _ in parts for name in samples.class_names}))
    return names, [remap_labels(samples.y, samples.class_names, names, source)
                   for samples, source in parts]


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
    """Labels as int64; a fraction or a negative label is a data error, never rounded away."""
    if labels.dtype.kind not in "iuf":
        raise FedgeError(f"labels in {path} must be integer class ids or class names, not "
                         f"{labels.dtype}")
    valid = (np.isfinite(labels) & (labels >= 0) & (np.floor(labels) == labels)
             & (labels <= MAX_CLASS_ID))
    if not valid.all():
        raise FedgeError(f"{path} has label {labels[~valid][0]:g}, "
                         "but labels must be integer class ids 0, 1, 2, ... (or class names)")
    return labels.astype(np.int64)


def _read_csv(path: Path, label_column: str, group_column: str | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    header = _csv_header(path)
    for column in (label_column, group_column):
        if column is not None and column not in header:
            raise FedgeError(f"{path} has no {column!r} column; "
                             f"its columns are: {', '.join(header)}")
    if group_column == label_column:
        raise FedgeError(f"column {label_column!r} of {path} cannot be both the "
                         "label and the group of a sample")
    special = [c for c in (label_column, group_column) if c is not None]
    features = [i for i, name in enumerate(header) if name not in special]
    if not features:
        raise FedgeError(f"{path} has no feature columns besides "
                         f"{' and '.join(repr(c) for c in special)}")
    text_columns = [header.index(column) for column in special]
    try:
        x = read_numbers(path, 1, len(header), text_columns, np.float32)[:, features]
        texts = np.char.strip(_read_texts(path, 1, text_columns))
    except (ValueError, UnicodeDecodeError) as error:
        _explain_csv(path, header, label_column, group_column)
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    labels = _csv_labels(texts[:, 0])
    groups = None if group_column is None else texts[:, 1]
    if (labels is None or not np.isfinite(x).all()
            or (groups is not None and (groups == "").any())):
        _explain_csv(path, header, label_column, group_column)
        raise FedgeError(f"{path} holds a value that is not a finite float32 number")
    return x, labels, groups


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


def _explain_csv(path: Path, header: list[str], label_column: str,
                 group_column: str | None) -> None:
    """Raise the first problem of a CSV file of labelled samples, naming its line and
    column; return if there is none. Reads one row at a time."""
    label_at = header.index(label_column)
    group_at = None if group_column is None else header.index(group_column)
    features = [i for i, name in enumerate(header) if name not in (label_column, group_column)]
    number = named = bad_number = None  # (line, label) of the first such label
    try:
        for line, row in csv_rows(path, 1):
            _check_width(row, len(header), line, path)
            for i in features:
                _number(row[i], header[i], line, path)
            if group_at is not None:
                _group(row[group_at], group_column, line, path)
            label = row[label_at].strip()
            if not label:
                raise FedgeError(f"line {line} of {path} has no label in column "
                                 f"{label_column!r}")
            if is_number(label):
                number = number or (line, label)
                if not abs(float(label)) <= FLOAT32_MAX:
                    bad_number = bad_number or (line, label)
            else:
                named = named or (line, label)
            if number and named:
                raise FedgeError(f"column {label_column!r} of {path} mixes class ids and "
                                 f"class names (line {number[0]} holds {number[1]!r}, line "
                                 f"{named[0]} {named[1]!r}); label every sample by id or "
                                 "every sample by name")
    except UnicodeDecodeError:
        raise FedgeError(f"{path} is not a UTF-8 text file; a CSV must be") from None
    except csv.Error as error:
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    if bad_number:
        line, label = bad_number
        _number(label, label_column, line, path)


def _check_width(row: list[str], width: int, line: int, path: Path) -> None:
    if len(row) != width:
        raise FedgeError(f"line {line} of {path} has {len(row)} values, "
                         f"but the header names {width} columns")


def _group(text: str, column: str, line: int, path: Path) -> None:
    if not text.strip():
        raise FedgeError(f"line {line} of {path} has no value in column {column!r}, "
                         "which groups the samples")


def _csv_labels(labels: np.ndarray) -> np.ndarray | None:
    """Numbers when every label is a finite number (class ids), text when none is a
    number (class names); None for an empty label, a mix, or a number beyond float32."""
    names, where = np.unique(labels, return_inverse=True)  # few distinct labels: cheap
    numbers = [float(name) if is_number(name) else None for name in names]
    if "" in names.tolist():
        return None
    if all(number is None for number in numbers):
        return labels
    if any(number is None or not abs(number) <= FLOAT32_MAX for number in numbers):
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


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
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
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise FedgeError(f"{path} has x of shape {x.shape} and y of shape {y.shape}, "
                         "but needs one row of x and one label in y per sample")
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


def _read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise FedgeError(f"{root} has no class sub-folders; put each class's images "
                         "in a sub-folder of its own")
    by_id = [f for f in folders if f.name.isascii() and f.name.isdigit()]
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
    labels = [int(f.name) if by_id else f.name for _, f in files]
    return images, np.array(labels, dtype=np.int64 if by_id else str)


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
