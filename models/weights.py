"""Pretrained weights for the federation's starting model (``--init``), the parameters
left fresh (``--reset``) and those not trained at all (``--freeze``)."""

import fnmatch
import zipfile
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn

from fedge.errors import FedgeError

CHECKPOINT_FORMAT = "fedge-checkpoint"  # as fedge.server.checkpoint writes it
SUPPORTED = "a torch state_dict (.pt, .pth), a .safetensors file or a fedge checkpoint"
RUNNING_STATISTICS = ("running_mean", "running_var")  # BatchNorm's buffers, by name


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from ``path``; never unpickles code (``weights_only``)."""
    if path.is_dir():
        raise FedgeError(f"--init {path} is a folder; give {SUPPORTED}")
    if not path.is_file():
        raise FedgeError(f"--init {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's safe unpickler raises many kinds on a bad file
        raise FedgeError(f"--init {path} is not {SUPPORTED}: {type(error).__name__}"
                         ) from error
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        payload = payload.get("state_dict")
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]  # a training script's {"state_dict": ..., ...}
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise FedgeError(f"--init {path} holds no tensors by name; give {SUPPORTED}")
    return payload


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise FedgeError(f"--init {path} is not a readable .safetensors file: {error}"
                         ) from error


def matching(names: Sequence[str], patterns: Sequence[str], option: str) -> set[str]:
    """The ``names`` any glob in ``patterns`` matches; a glob that matches nothing is a
    mistake, reported with the names there are."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise FedgeError(f"{option} {pattern!r} matches none of the model's parameters "
                             f"({shown})")
        matched.update(hits)
    return matched


def frozen_statistics_layers(model: nn.Module, frozen: Collection[str]) -> list[str]:
    """The layers of ``model`` (BatchNorm's, and any other that keeps ``running_mean`` and
    ``running_var``) whose running statistics are among the ``frozen`` entries: local
    training keeps them in eval mode, so that they normalize with those statistics, as
    evaluation, export and devices do, and leave them unchanged. Their weight and bias
    train unless frozen too. Freezing one of a layer's two statistics is a mistake."""
    layers = []
    for layer, module in model.named_modules():
        own = {name for name, _ in module.named_buffers(recurse=False)}
        if not own.issuperset(RUNNING_STATISTICS):
            continue
        entries = [f"{layer}.{name}" if layer else name for name in RUNNING_STATISTICS]
        held = [entry in frozen for entry in entries]
        if all(held):
            layers.append(layer)
        elif any(held):
            raise FedgeError(f"--freeze matches {entries[held.index(True)]} but not "
                             f"{entries[held.index(False)]}: a layer's running statistics "
                             "are frozen together (freeze both, or neither)")
    return layers


def train_mode(model: nn.Module, frozen_statistics: Collection[str] = ()) -> nn.Module:
    """``model`` in training mode, but for the layers ``frozen_statistics`` names
    (:func:`frozen_statistics_layers`), which stay in eval mode."""
    model.train()
    for layer in frozen_statistics:
        model.get_submodule(layer).eval()
    return model


def load_initial_weights(model: nn.Module, path: Path, reset: set[str]) -> None:
    """Put the weights in ``path`` into ``model``, except the entries in ``reset``, which
    keep their fresh initialization and need not be in the file (a new classifier head).
    One error lists everything that does not fit."""
    weights, state = read_weights(path), model.state_dict()
    wanted = [name for name in state if name not in reset]
    missing = [name for name in wanted if name not in weights]
    unexpected = sorted(set(weights) - set(state))
    misshaped = [f"{name} (file {tuple(weights[name].shape)}, model "
                 f"{tuple(state[name].shape)})" for name in wanted
                 if name in weights and weights[name].shape != state[name].shape]
    problems = [f"{label} {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped)) if names]
    if problems:
        hint = " (--reset GLOB leaves parameters fresh)" if missing or misshaped else ""
        raise FedgeError(f"--init {path} does not fit the model: {'; '.join(problems)}{hint}")
    model.load_state_dict({**state, **{name: weights[name].to(state[name].dtype)
                                       for name in wanted}})
