"""A device's own labelled samples, read from a file or folder its user supplies."""

import csv
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedge.errors import FedgeError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # samples are float32 tensors
MAX_CLASS_ID = 2**31 - 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED = ("a .csv file with a header row, an .npz file with arrays x and y, "
             "or a folder with one sub-folder of images per class")


def load_labelled_data(path: Path, *, label_column: str = "label",
                       sample_shape: tuple[int, ...] | None = None,
                       class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples x and integer labels y (int64) from a CSV, an NPZ, or an image folder.

    ``sample_shape`` is the shape the model takes, so that flat CSV rows of 64 pixels can
    feed a model of (1, 8, 8) images. ``class_names`` lists image sub-folder names in
    class-id order.
    """
    path = Path(path)
    if path.is_dir():
        x, y = _read_image_folder(path, class_names)
    elif not path.exists():
        raise FedgeError(f"no such file or folder: {path}")
    elif path.suffix.lower() == ".csv":
        x, y = _read_csv(path, label_column)
    elif path.suffix.lower() == ".npz":
        x, y = _read_npz(path)
    else:
        raise FedgeError(f"cannot read {path}: use {SUPPORTED}")
    if len(y) == 0:
        raise FedgeError(f"{path} holds no samples")
    return (x if sample_shape is None else _reshaped(x, tuple(sample_shape), path)), y


def _reshaped(x: np.ndarray, sample_shape: tuple[int, ...], path: Path) -> np.ndarray:
    if math.prod(x.shape[1:]) != math.prod(sample_shape):
        raise FedgeError(f"samples in {path} have shape {x.shape[1:]}, "
                         f"but the model expects samples of shape {sample_shape}")
    return x.reshape(len(x), *sample_shape)


def _class_ids(labels: np.ndarray, path: Path) -> np.ndarray:
    """Labels as int64; a fraction or a negative label is a data error, never rounded away."""
    if labels.dtype.kind not in "iuf":
        raise FedgeError(f"labels in {path} must be integer class ids, not {labels.dtype}")
    valid = (np.isfinite(labels) & (labels >= 0) & (np.floor(labels) == labels)
             & (labels <= MAX_CLASS_ID))
    if not valid.all():
        raise FedgeError(f"{path} has label {labels[~valid][0]:g}, "
                         "but labels must be integer class ids 0, 1, 2, ...")
    return labels.astype(np.int64)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise FedgeError(f"{path} is empty; it needs a header row naming its columns")
            if label_column not in header:
                raise FedgeError(f"{path} has no {label_column!r} column; "
                                 f"its columns are: {', '.join(header)}")
            if len(header) == 1:
                raise FedgeError(f"{path} has no feature columns besides {label_column!r}")
            rows = [_numbers(row, header, reader.line_num, path) for row in reader if row]
    except UnicodeDecodeError:
        raise FedgeError(f"{path} is not a UTF-8 text file; a CSV must be") from None
    except csv.Error as error:
        raise FedgeError(f"{path} is not a readable CSV file: {error}") from None
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    label_at = header.index(label_column)
    x = np.delete(table, label_at, axis=1).astype(np.float32)
    return x, _class_ids(table[:, label_at], path)


def _numbers(row: list[str], header: list[str], line: int, path: Path) -> list[float]:
    if len(row) != len(header):
        raise FedgeError(f"line {line} of {path} has {len(row)} values, "
                         f"but the header names {len(header)} columns")
    values = []
    for text, column in zip(row, header, strict=True):
        try:
            value = float(text)
        except ValueError:
            raise FedgeError(f"line {line} of {path} holds {text!r} in column {column!r}, "
                             "which is not a number") from None
        if not abs(value) <= FLOAT32_MAX:  # float() reads "nan" and "inf" too
            within = f" within ±{FLOAT32_MAX:.3g}" if math.isfinite(value) else ""
            raise FedgeError(f"line {line} of {path} holds {text.strip()!r} in column "
                             f"{column!r}; values must be finite numbers{within}")
        values.append(value)
    return values


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
    if x.dtype.kind in "iu":  # token ids for text models, which embed rather than scale them
        return x.astype(np.int64), _class_ids(y, path)
    if x.dtype.kind not in "fb":
        raise FedgeError(f"x in {path} must be numeric, not {x.dtype}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes Inf, refused below
        x = x.astype(np.float32)
    finite = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if not finite.all():
        raise FedgeError(f"x in {path} holds NaN, Inf or values beyond float32's range in "
                         f"{int((~finite).sum())} samples (the first is sample "
                         f"{int(np.argmin(finite))}); values must be finite numbers")
    return x, _class_ids(y, path)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _read_image_folder(root: Path,
                       class_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise FedgeError(f"{root} has no class sub-folders; put each class's images "
                         "in a sub-folder of its own")
    ids = {folder: _class_id(folder, class_names) for folder in folders}
    files = [(file, ids[folder]) for folder in folders for file in sorted(folder.iterdir())
             if file.suffix.lower() in IMAGE_SUFFIXES and _visible(file)]
    if not files:
        raise FedgeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the sub-folders of {root}")
    images = [_read_image(file) for file, _ in files]
    for (file, _), image in zip(files, images, strict=True):
        if image.shape != images[0].shape:
            raise FedgeError(f"images in {root} must share one size and mode, but {file} has "
                             f"shape {image.shape} and {files[0][0]} {images[0].shape}")
    return np.stack(images), np.array([class_id for _, class_id in files], dtype=np.int64)


def _class_id(folder: Path, class_names: Sequence[str] | None) -> int:
    """Every client must give a class the same id, even a client lacking some classes."""
    if class_names is not None:
        if folder.name not in class_names:
            raise FedgeError(f"image folder {folder} is not one of the classes: "
                             f"{', '.join(class_names)}")
        return list(class_names).index(folder.name)
    if not (folder.name.isascii() and folder.name.isdigit()):
        raise FedgeError(f"image folder {folder} is not named by a class id 0, 1, 2, ...; "
                         "rename it or pass class_names")
    return int(folder.name)


def _read_image(file: Path) -> np.ndarray:
    """Raw 0..255 pixels, channels first: scaling is the model's job."""
    from PIL import Image  # only image folders need Pillow; keep client start-up light

    try:
        with Image.open(file) as image:
            pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"),
                                dtype=np.float32)
    except OSError as error:
        raise FedgeError(f"{file} is not a readable image") from error
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
