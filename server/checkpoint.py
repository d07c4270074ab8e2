"""Checkpoints: a round's global weights with everything needed to resume or export."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedge.errors import FedgeError
from fedge.models.hf import PREFIX
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
    model_origin: str | None = None  # where the model came from, e.g. /abs/my_model.py:Net
    frozen: tuple[str, ...] = ()  # state entries the clients neither trained nor sent

    def model(self) -> nn.Module:
        """The network of this checkpoint, holding its weights."""
        model = build_model(self.model_spec)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            raise FedgeError(f"the checkpoint's weights do not fit its model spec: "
                             f"{error}") from error
        return model

    def save(self, path: Path) -> None:
        save_torch(path, {
            "format": FORMAT, "version": VERSION, "round": self.round,
            "state_dict": self.state_dict, "model_spec": self.model_spec.to_json(),
            "config": self.config, "reference_inputs": self.reference_inputs,
            "history": self.history, "best_round": self.best_round, "initial": self.initial,
            "strategy_state": self.strategy_state, "model_origin": self.model_origin,
            "frozen": list(self.frozen),
            # Your own model's program, so that export and resume need no source code.
            "model_program": (None if self.model_spec.program is None else
                              torch.frombuffer(bytearray(self.model_spec.program),
                                               dtype=torch.uint8)),
        })


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by fedge; anything else is a clear error."""
    if path.is_dir():
        raise FedgeError(f"{path} is a folder; give its checkpoint.pt or best.pt")
    if not path.is_file():
        raise FedgeError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise FedgeError(f"{path} is empty, not a checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's safe unpickler raises many kinds on a bad file
        reason = f"{type(error).__name__}: {error}".strip().rstrip(":")
        raise FedgeError(f"{path} is not a readable checkpoint "
                         f"(corrupt or not a torch file): {reason}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedgeError(f"{path} is not a fedge checkpoint")
    if payload.get("version") != VERSION:
        raise FedgeError(f"{path} has checkpoint version {payload.get('version')}, "
                         f"this fedge reads version {VERSION}")
    try:
        spec = ModelSpec.from_json(payload["model_spec"])
        program = payload.get("model_program")
        if isinstance(program, torch.Tensor):
            spec = spec.model_copy(update={"program": program.numpy().tobytes()})
        elif spec.carries_program:
            raise FedgeError(f"{path} is damaged: it lacks the program of its model "
                             f"{spec.name}")
        origin = payload.get("model_origin")
        if spec.pretrained is not None and isinstance(origin, str):
            # The base the run started from: export and resume read it there again.
            spec = spec.model_copy(update={"base_folder": origin.removeprefix(PREFIX)})
        checkpoint = Checkpoint(
            round=payload["round"], state_dict=payload["state_dict"],
            model_spec=spec, config=payload["config"],
            reference_inputs=payload["reference_inputs"], history=payload["history"],
            best_round=payload["best_round"], initial=payload["initial"],
            strategy_state=payload["strategy_state"],
            model_origin=payload.get("model_origin"),
            frozen=tuple(payload.get("frozen") or ()),
        )
    except KeyError as error:
        raise FedgeError(f"{path} is an incomplete fedge checkpoint: no {error}") from error
    _check_contents(path, checkpoint)
    return checkpoint


def _check_contents(path: Path, checkpoint: Checkpoint) -> None:
    """The parts a later export or resume relies on have the types and shapes they need."""
    weights = checkpoint.state_dict
    if (not isinstance(weights, dict) or not weights
            or not all(isinstance(value, torch.Tensor) for value in weights.values())):
        raise FedgeError(f"{path} holds no model weights (a dict of tensors)")
    inputs, shape = checkpoint.reference_inputs, checkpoint.model_spec.input_shape
    if (not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or len(inputs) == 0
            or tuple(inputs.shape[1:]) != shape):
        found = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise FedgeError(f"{path} is damaged: its reference inputs ({found}) are not a batch "
                         f"of samples of its model's shape {shape}")
    if not isinstance(checkpoint.round, int) or not isinstance(checkpoint.history, list):
        raise FedgeError(f"{path} is damaged: its round or history is malformed")
