"""The binary format devices without Python read and write: a JSON header, then arrays.

``u32 little-endian header length | UTF-8 JSON header | the arrays' bytes``: the header's
``arrays`` lists ``{"name", "shape", "dtype"}`` for each array, in the order their
little-endian, C-ordered bytes follow it. Weights, updates and a device's local samples
all travel in it (see ``client/device/PROTOCOL.md``), because a C++, Kotlin or Swift
program can read it with a few lines and no library. numpy only.
"""

import json
import struct
from collections.abc import Mapping

import numpy as np

from fedge.errors import FedgeError

DTYPES = ("float32", "int64")
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


def unpack(data: bytes, what: str = "the blob") -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the arrays of :func:`pack`'s output, or a clear error naming
    ``what`` when it is not one (cut short, a bad header, sizes that do not add up)."""
    if len(data) < _LENGTH.size:
        raise FedgeError(f"{what} is {len(data)} bytes: too short for a header")
    (length,) = _LENGTH.unpack_from(data)
    try:
        header = json.loads(bytes(data[_LENGTH.size:_LENGTH.size + length]))
        listed = header["arrays"]
        specs = [(str(a["name"]), tuple(int(n) for n in a["shape"]), np.dtype(a["dtype"]))
                 for a in listed]
    except (ValueError, KeyError, TypeError) as error:
        raise FedgeError(f"{what} has no valid header: {error}") from None
    offset, arrays = _LENGTH.size + length, {}
    for name, shape, dtype in specs:
        if dtype.name not in DTYPES or any(n < 0 for n in shape):
            raise FedgeError(f"{what}: array {name!r} has dtype {dtype} and shape {shape}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(data):
            raise FedgeError(f"{what} is cut short: array {name!r} needs {size} bytes "
                             f"at offset {offset}, the blob has {len(data)}")
        arrays[name] = np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=size
                                     // dtype.itemsize, offset=offset).reshape(shape
                                                                               ).astype(dtype)
        offset += size
    if offset != len(data):
        raise FedgeError(f"{what} has {len(data) - offset} bytes after its last array")
    return header, arrays
