"""Files that are either whole or absent: written to a temporary name, then renamed."""

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

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
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def refuse_overwrite(paths: Iterable[Path]) -> None:
    """Keys and certificates are irreplaceable once devices trust them: never overwrite."""
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise FedgeError(f"refusing to overwrite existing files: {', '.join(existing)}")
