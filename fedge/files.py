"""Files that are either whole or absent: written to a temporary name, then renamed."""

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedge.errors import FedgeError


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path``: renaming it onto ``path`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` in one step; ``mode`` applies from the first byte
    (use 0o600 for secrets), further restricted by the umask."""
    tmp = temporary_sibling(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise FedgeError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_all_or_none(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write every ``path: (data, mode)`` or, should one fail (a full disk), none: files
    that belong together (a key pair, a CA and its server certificate) never exist in
    part. The paths must not exist yet."""
    written: list[Path] = []
    try:
        for path, (data, mode) in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, mode)
            written.append(path)
    except (FedgeError, OSError) as error:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(error, FedgeError):
            raise
        raise FedgeError(f"cannot write {next(iter(files)).parent}: {error.strerror}") from None


def finite_number(value: object) -> bool:
    """A number (not a boolean) that a float holds, finite: what strict JSON, metrics and
    weights take as a number (an int too large for a float is not one)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (JSON's null): standard JSON
    has no NaN, and parsers reject Python's ``NaN`` token."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as strict JSON (non-finite numbers become null), written atomically."""
    text = json.dumps(strict_json(payload), indent=2, allow_nan=False)
    write_atomic(path, (text + "\n").encode())


def check_output_folder(folder: Path) -> None:
    """``folder`` is, or can become, a folder to write into."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise FedgeError(f"cannot write into {folder}: {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise FedgeError(f"cannot write into {folder}: {parent} is not writable")
            return


def refuse_overwrite(paths: Iterable[Path]) -> None:
    """Keys and certificates are irreplaceable once devices trust them: never overwrite."""
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise FedgeError(f"refusing to overwrite existing files: {', '.join(existing)}")


def check_output_file(output: Path, overwrite: bool, source: Path) -> None:
    """An output file that can be written from ``source``, without destroying anything by
    mistake, in a folder that exists or can be made (by :func:`folder_for`)."""
    if output.is_dir():
        raise FedgeError(f"{output} is a folder; give the file to write")
    if output.exists() and not overwrite:
        raise FedgeError(f"{output} already exists; pass --overwrite to replace it")
    if output.exists() and source.exists() and output.samefile(source):
        raise FedgeError(f"{output} is the checkpoint itself; write the model elsewhere")
    check_output_folder(output.parent)


@contextlib.contextmanager
def folder_for(output: Path) -> Iterator[None]:
    """The folders ``output`` lacks, made for the block that writes it and removed again
    if the block fails: a failed command leaves no empty folder behind."""
    missing = [folder for folder in (output.parent, *output.parent.parents)
               if not folder.exists()]  # the deepest first
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FedgeError(f"cannot make the folder of {output}: {error.strerror}") from None
    try:
        yield
    except BaseException:
        for folder in missing:
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                folder.rmdir()
        raise
