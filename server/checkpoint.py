"""Checkpoints: a round's global weights with everything needed to resume or export."""

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedge.errors import FedgeError
from fedge.models.registry import ModelSpec, build_model
from fedge.server.run_folder import save_torch

FORMAT = "fedge-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    round: int
    state_dict: dict[str, torch.Tensor]
    model_spec: ModelSpec
    config: dict
    reference_inputs: torch.Tensor
    history: list[dict] = field(default_factory=list)
    best_round: int | None = None
    initial: dict | None = None  # the untrained model's validation metrics
    strategy_state: dict = field(default_factory=dict)

    def model(self) -> nn.Module:
        """The network of this checkpoint, holding its weights."""
        model = build_model(self.model_spec)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            raise FedgeError(f"checkpoint weights do not fit its model spec: {error}") from error
        return model

    def save(self, path: Path) -> None:
        save_torch(path, {
            "format": FORMAT, "version": VERSION, "round": self.round,
            "state_dict": self.state_dict, "model_spec": self.model_spec.to_json(),
            "config": self.config, "reference_inputs": self.reference_inputs,
            "history": self.history, "best_round": self.best_round, "initial": self.initial,
            "strategy_state": self.strategy_state,
        })


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by fedge; anything else is a clear error."""
    if not path.is_file():
        raise FedgeError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile,
            ValueError, OSError) as error:
        raise FedgeError(f"{path} is not a readable checkpoint "
                         f"(corrupt or not a torch file): {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedgeError(f"{path} is not a fedge checkpoint")
    if payload.get("version") != VERSION:
        raise FedgeError(f"{path} has checkpoint version {payload.get('version')}, "
                         f"this fedge reads version {VERSION}")
    try:
        return Checkpoint(
            round=payload["round"], state_dict=payload["state_dict"],
            model_spec=ModelSpec.from_json(payload["model_spec"]), config=payload["config"],
            reference_inputs=payload["reference_inputs"], history=payload["history"],
            best_round=payload["best_round"], initial=payload["initial"],
            strategy_state=payload["strategy_state"],
        )
    except KeyError as error:
        raise FedgeError(f"{path} is an incomplete fedge checkpoint: no {error}") from error
