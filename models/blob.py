"""The binary format devices without Python read and write: a JSON header, then arrays.

``u32 little-endian header length | UTF-8 JSON header | the arrays' bytes``: the header's
``arrays`` lists ``{"name", "shape", "dtype"}`` for each array, in the order their
little-endian, C-ordered bytes follow it. Weights, updates and a device's local samples
all travel in it (see ``client/device/PROTOCOL.md``), because a C++, Kotlin or Swift
program can read it with a few lines and no library. numpy only.
"""

import json
import math
import reprlib
import struct
from collections.abc import Mapping

import numpy as np

from fedge.errors import FedgeError

DTYPES = ("float32", "int64")
MAX_DIMENSIONS = 32  # of an array (numpy's own limit is 64)
_LENGTH = struct.Struct("<I")


def pack(header: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> bytes:
    """``header`` (JSON; its ``arrays`` entry is written here) followed by ``arrays``."""
    listed = []
    for name, array in arrays.items():
        if array.dtype.name not in DTYPES:
            raise FedgeError(f"array {name!r} is {array.dtype}; blobs hold {', '.join(DTYPES)}")
        listed.append({"name": name, "shape": list(array.shape), "dtype": array.dtype.name})
    text = json.dumps({**header, "arrays": listed}, allow_nan=False).encode()
    body = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False)
                    .tobytes() for a in arrays.values())
    return _LENGTH.pack(len(text)) + text + body


def read_json(data: bytes, what: str) -> object:
    """Strict JSON (no NaN or Infinity) from ``data``, or a FedgeError saying why ``what``
    is none, also for nesting too deep for the parser (a RecursionError in json)."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise FedgeError(f"{what} nests JSON too deeply") from None
    except ValueError as error:  # UnicodeDecodeError too
        raise FedgeError(f"{what} is not JSON: {error}") from None


def unpack(data: bytes, what: str = "the blob") -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the arrays of :func:`pack`'s output, or a clear error naming
    ``what`` when it is not one (cut short, a bad header, sizes that do not add up). A
    blob may come from anyone: nothing in it is trusted before it is checked."""
    if len(data) < _LENGTH.size:
        raise FedgeError(f"{what} is {len(data)} bytes: too short for a header")
    (length,) = _LENGTH.unpack_from(data)
    offset = _LENGTH.size + length
    if offset > len(data):
        raise FedgeError(f"{what} is cut short: its header needs {length} bytes, "
                         f"{len(data) - _LENGTH.size} follow")
    header = read_json(bytes(data[_LENGTH.size:offset]), f"{what}'s header")
    arrays: dict[str, np.ndarray] = {}
    for name, shape, dtype in _listed_arrays(header, what):
        if name in arrays:
            raise FedgeError(f"{what} lists array {_brief(name)} twice")
        size = math.prod(shape) * dtype.itemsize  # exact: no overflow in Python's int
        if offset + size > len(data):
            raise FedgeError(f"{what} is cut short: array {_brief(name)} needs {size} bytes "
                             f"at offset {offset}, the blob has {len(data)}")
        try:
            arrays[name] = np.frombuffer(data, dtype=dtype.newbyteorder("<"),
                                         count=size // dtype.itemsize, offset=offset
                                         ).reshape(shape).astype(dtype)
        except ValueError:  # an empty array whose other sizes no array can have
            raise FedgeError(f"{what}: array {_brief(name)} has shape {_brief(shape)}, "
                             "larger than any array") from None
        offset += size
    if offset != len(data):
        raise FedgeError(f"{what} has {len(data) - offset} bytes after its last array")
    return header, arrays


def _listed_arrays(header: object, what: str) -> list[tuple[str, list[int], np.dtype]]:
    """Each array the header lists: its name, shape and dtype, checked."""
    listed = header.get("arrays") if isinstance(header, dict) else None
    if not isinstance(listed, list):
        raise FedgeError(f"{what}'s header is not a JSON object with a list \"arrays\"")
    specs = []
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FedgeError(f"{what}'s header lists {_brief(entry)}, not an array "
                             '{"name", "shape", "dtype"}')
        name, shape, dtype = entry["name"], entry.get("shape"), entry.get("dtype")
        if dtype not in DTYPES:
            raise FedgeError(f"{what}: array {_brief(name)} has dtype {_brief(dtype)}; "
                             f"blobs hold {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMENSIONS
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63
                        for n in shape)):
            raise FedgeError(f"{what}: array {_brief(name)} has shape {_brief(shape)}, not "
                             f"a list of at most {MAX_DIMENSIONS} sizes (int64, not negative)")
        specs.append((name, shape, np.dtype(dtype)))
    return specs


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def _brief(value: object) -> str:
    """``repr(value)``, shortened: what a blob holds may be any size."""
    brief = reprlib.Repr()
    brief.maxstring, brief.maxlevel = 80, 2
    return brief.repr(value)
