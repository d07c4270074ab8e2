"""A device's local samples as the file ``fedge-device --data`` reads (PROTOCOL.md)."""

from pathlib import Path

import numpy as np

from fedge.config import default
from fedge.datafiles import load_labelled_data
from fedge.files import check_output_file, folder_for, write_atomic
from fedge.models.blob import pack

DATA_FORMAT = "fedge-device-data/1"


def write_device_data(source: Path, output: Path, label_column: str = default("label_column"),
                      overwrite: bool = False) -> int:
    """The samples of ``source`` (CSV, NPZ or image folder) written to ``output``; their
    number. Named labels become ids in sorted name order, and the names travel along."""
    check_output_file(output, overwrite, source)
    samples = load_labelled_data(source, label_column=label_column)
    # Token ids stay whole numbers; everything else is the float32 the programs take.
    x = samples.x.astype(np.int64 if np.issubdtype(samples.x.dtype, np.integer)
                         else np.float32)
    names = list(samples.class_names) if samples.class_names else None
    with folder_for(output):
        write_atomic(output, pack({"format": DATA_FORMAT, "class_names": names},
                                  {"x": x, "y": samples.y.astype(np.int64)}))
    return len(samples.y)
