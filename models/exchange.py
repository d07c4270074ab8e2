"""Which of a model's state entries travel back from clients: numpy only, for the
client's mods that run in the relay process without torch.

A client sends its floating-point entries that are not frozen (``--freeze``). Frozen
entries are not trained and keep the server's values. Integer entries, such as
BatchNorm's ``num_batches_tracked``, are counters rather than weights: an average of
counters means nothing and would dwarf the weights in every update norm (clipping,
screening), so they keep the server's values too.
"""

import io
import json
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedge.errors import FedgeError
from fedge.protocol import FROZEN_KEY

PROGRAM_FORMAT = 1  # of the archive (fedge.models.program)


def exchanged_names(dtypes: Mapping[str, object], frozen: Collection[str]) -> list[str]:
    """The names, in order, of the entries (by name: their dtype, anything numpy reads as
    one) that clients train and send."""
    return [name for name, dtype in dtypes.items()
            if np.dtype(dtype).kind == "f" and name not in frozen]


def frozen_from_config(config: Mapping[str, object]) -> set[str]:
    """The frozen entries a train config names (none if it names none)."""
    names = config.get(FROZEN_KEY, [])
    return {str(name) for name in names} if isinstance(names, list) else set()


@dataclass(frozen=True)
class Entry:
    """One state entry of a model program."""

    shape: tuple[int, ...]
    dtype: str
    parameter: bool


def program_files(program: bytes) -> dict[str, bytes]:
    """The members of a program archive (:mod:`fedge.models.program`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(program)) as zipped:
            return {name: zipped.read(name) for name in
                    ("train.json", "eval.json", "manifest.json", "constants.npz")}
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
        raise FedgeError(f"the model program is damaged: {error}") from error


def read_manifest(program: bytes) -> dict[str, Entry]:
    """A program's state entries by name, in the model's order."""
    try:
        document = json.loads(program_files(program)["manifest.json"])
        if document.get("format") != PROGRAM_FORMAT:
            raise FedgeError(f"the model program has format {document.get('format')}, "
                             f"this fedge reads format {PROGRAM_FORMAT}: update fedge")
        return {name: Entry(tuple(int(d) for d in e["shape"]), str(e["dtype"]),
                            bool(e["parameter"]))
                for name, e in document["entries"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FedgeError(f"the model program's manifest is damaged: {error}") from error
