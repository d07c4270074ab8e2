"""The federation's starting model: a built-in network or your own, with its initial
weights (``--init``, ``--reset``) and the entries clients do not train (``--freeze``).

Everything is checked here, before any file is written or process started: the model
file imports, its factory takes fedge's arguments, it turns the server's samples into
logits, the weights fit, every glob matches, something is left to train, no layer has
only one of its running statistics frozen, and your own model can be shipped to devices
as a program.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.models.edge import EdgePrograms, export_edge_programs
from fedge.models.hf import PREFIX, is_pretrained, pretrained_spec
from fedge.models.networks import InputScaling
from fedge.models.program import export_program, fingerprint
from fedge.models.registry import (
    ModelSpec,
    as_input_tensor,
    build_model,
    check_labelled_samples,
    spec_from_data,
)
from fedge.models.source import (
    add_input_scaling,
    check_logits,
    instantiate,
    resolve_factory,
    with_file_path,
)
from fedge.models.tasks import with_task
from fedge.models.weights import frozen_statistics_layers, load_initial_weights, matching


@dataclass(frozen=True)
class StartingModel:
    spec: ModelSpec  # your own model's carries its program and fingerprint
    state: dict[str, torch.Tensor]
    frozen: tuple[str, ...]  # state entries clients neither train nor send
    origin: str  # where the model came from
    edge: EdgePrograms | None = None  # ExecuTorch programs for devices (--edge-programs)


def starting_model(config: RunConfig, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
                   vocab_size: int | None = None, class_names: tuple[str, ...] | None = None,
                   factory: Callable[..., nn.Module] | None = None,
                   non_feature_columns: tuple[str, ...] = ()) -> StartingModel:
    """The model a new run starts from, fitted to the server's validation samples; your
    own ``factory`` (the Python API) stands in for ``config.model.name``'s import.
    ``non_feature_columns``: the CSV columns of the run's data that are no features,
    recorded with the model for ``fedge predict``."""
    if config.model.name is None:
        raise FedgeError("the server needs a model")
    # Devices see the file's name, not the server's folders.
    name = with_file_path(config.model.name, lambda path: Path(path.name))
    spec = spec_from_data(name, val_x, num_classes, config.model.dropout, vocab_size=vocab_size,
                          class_names=class_names, scale_inputs=config.model.scale_inputs,
                          non_feature_columns=non_feature_columns, task=config.task.name)
    spec = with_task(spec, config.task, val_y)
    check_labelled_samples(spec, val_x, val_y, "the server's validation data")
    with torch.random.fork_rng():  # the same seed, the same starting weights
        torch.manual_seed(config.seed)
        if is_pretrained(config.model.name):
            spec = pretrained_spec(spec, config.model)
            origin, model = f"{PREFIX}{spec.base_folder}", build_model(spec)
        elif spec.builtin:
            origin, model = f"fedge built-in model {spec.name}", build_model(spec)
        else:
            origin, factory = ((config.model.name, factory) if factory
                               else resolve_factory(config.model.name))
            model = instantiate(origin, factory, spec.input_shape, spec.outputs,
                                spec.dropout)
            if spec.input_mean is not None:
                add_input_scaling(model, InputScaling(spec.input_mean, spec.input_std,
                                                      ndim=len(spec.input_shape) + 1))
            origin = with_file_path(origin, Path.resolve)
    names = list(model.state_dict())
    reset = matching(names, config.model.reset, "--reset")
    if config.model.init:
        load_initial_weights(model, Path(config.model.init), reset)
    elif config.model.reset:
        raise FedgeError("--reset leaves parameters fresh instead of --init's weights; give "
                         "--init too")
    frozen = matching(names, config.model.freeze, "--freeze")
    if config.model.freeze and not any(name not in frozen for name, _ in model.named_parameters()):
        raise FedgeError(f"--freeze {' '.join(config.model.freeze)} freezes every parameter: "
                         "nothing is left to train")
    frozen_statistics = frozen_statistics_layers(model, frozen)
    sample = as_input_tensor(spec, np.concatenate([val_x[:2], val_x[:1]])[:2])
    check_logits(origin, model, sample, spec.outputs)
    if spec.carries_program:
        program = export_program(model, sample, frozen_statistics)
        # The fingerprint names the architecture, whatever --freeze keeps in eval mode: a
        # run started before frozen BatchNorm layers trained in eval mode still resumes.
        architecture = export_program(model, sample) if frozen_statistics else program
        spec = spec.model_copy(update={"program": program,
                                       "fingerprint": fingerprint(architecture)})
    edge = (export_edge_programs(model, spec, val_x, val_y, config.training.batch_size, frozen)
            if config.devices.edge_programs else None)
    return StartingModel(spec, {k: v.detach().clone() for k, v in model.state_dict().items()},
                         tuple(n for n in names if n in frozen), origin, edge)
