"""fedge: federated edge training on Flower, PyTorch and onnxruntime.

The Python API, :mod:`fedge.api`: ``fedge.simulate``, ``fedge.export``, ``fedge.predict``,
``fedge.evaluate``.
"""

from typing import Any

__all__ = ["SimulationResult", "evaluate", "export", "predict", "simulate"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: `python -m fedge.guard`, which starts every Flower process,
    # and `fedge predict` on a device need none of it.
    if name in __all__:
        from fedge import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedge' has no attribute {name!r}")
