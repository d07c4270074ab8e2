"""Device tokens: the bearer tokens devices present to the edge gateway.

:func:`make_tokens` writes each device's secret token (for the device) and its SHA-256
digest (for the gateway); :func:`read_token_digests` reads a folder of those digests, which
are all the gateway keeps of the tokens. A device name is 1 to 100 letters, digits, '_', '.'
or '-' (:func:`check_device_name`).
"""

import hashlib
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from fedge.errors import FedgeError
from fedge.files import check_output_folder, refuse_overwrite, write_all_or_none

DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def token_digest(token: str) -> str:
    """The SHA-256 hex digest of a token, which is all the gateway keeps of it."""
    return hashlib.sha256(token.encode()).hexdigest()


def make_tokens(names: Sequence[str], out_dir: Path) -> list[Path]:
    """For each device name, ``NAME.token`` (the secret, for the device: 32 random bytes as
    URL-safe text, no newline; mode 0600) and ``NAME.sha256`` (its SHA-256 hex digest, for
    the gateway). Returns the files written, each name's token then its digest. Names are
    checked and nothing is overwritten: a refused call writes nothing."""
    names = list(names)
    if not names:
        raise FedgeError("give at least one device name to make tokens for")
    for name in names:
        check_device_name(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FedgeError(f"device names must differ; given more than once: "
                         f"{', '.join(duplicates)}")
    check_output_folder(out_dir)
    files: dict[Path, tuple[bytes, int]] = {}
    for name in names:
        token = secrets.token_urlsafe(32)
        files[out_dir / f"{name}.token"] = (token.encode(), 0o600)
        files[out_dir / f"{name}.sha256"] = (f"{token_digest(token)}\n".encode(), 0o644)
    refuse_overwrite(files)
    write_all_or_none(files)
    return list(files)


def read_token_digests(folder: Path) -> dict[str, str]:
    """Device name -> token digest, from every ``NAME.sha256`` in ``folder``."""
    if not folder.is_dir():
        raise FedgeError(f"token folder {folder} does not exist; make the devices' tokens "
                         "with `fedge tokens`")
    digests: dict[str, str] = {}
    for path in sorted(folder.glob("*.sha256")):
        name = path.name.removesuffix(".sha256")
        if not DEVICE_NAME.fullmatch(name):
            raise FedgeError(f"{path}: {name!r} is not a device name (letters, digits, "
                             "'_', '.', '-')")
        try:
            text = path.read_bytes().decode("ascii").strip()
        except OSError as error:
            raise FedgeError(f"cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            text = ""
        if not HEX_DIGEST.fullmatch(text):
            raise FedgeError(f"{path} does not hold a SHA-256 hex digest (64 hex digits); "
                             "`fedge tokens` writes them")
        digests[name] = text.lower()
    if not digests:
        raise FedgeError(f"{folder} holds no NAME.sha256 token digests; make the devices' "
                         "tokens with `fedge tokens`")
    return digests


def check_device_name(name: object) -> None:
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise FedgeError(f"{name!r} is not a device name: use 1 to 100 letters, digits, "
                         "'_', '.' or '-'")
