"""The Flower ClientApp: receive global weights and the round's config, train, reply.

One message per client per round: the local validation metrics travel in the train
reply, and the server evaluates the global model itself.
"""

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from fedge.client.data import LocalData, node_seed
from fedge.client.tracking import LocalTracking
from fedge.client.training import LocalTraining, TrainReport, pick_device, train_locally
from fedge.config import TrainingSettings, default
from fedge.datafiles import remap_labels
from fedge.errors import FedgeError
from fedge.models.exchange import exchanged_names, frozen_from_config
from fedge.models.registry import ModelSpec, build_model
from fedge.protocol import (
    ARRAYS,
    CLIENT_KEY,
    CONFIG,
    METRICS,
    MODEL_SPEC,
    MONITOR,
    PROGRAM_KEY,
    PROXIMAL_MU,
    SEED,
    SERVER_ROUND,
    WEIGHT_KEY,
)

DataLoaderFn = Callable[[Context], LocalData]


class CannotTakePart(FedgeError):
    """This device's samples do not fit the federation's model: no round can succeed."""


def local_training_from_config(config: dict, node_seed: int) -> LocalTraining:
    """The server's ``train`` ConfigRecord as this node's local training."""
    return LocalTraining(TrainingSettings.from_config(config), seed=node_seed,
                         proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
                         monitor=str(config.get(MONITOR, "val_loss")))


def fit_to_model(spec: ModelSpec, data: LocalData) -> LocalData:
    """The samples in the model's input shape (flat CSV rows are reshaped), or a clear
    error: the first round is where a device learns which model it trains. Texts are
    tokenized to the model's length with this device's copy of its tokenizer."""
    data = _in_federation_ids(spec, data)
    if data.train_x.dtype.kind == "U":
        data = _tokenized(spec, data)
    sample_shape = tuple(data.train_x.shape[1:])
    if sample_shape != spec.input_shape:
        if math.prod(sample_shape) != math.prod(spec.input_shape):
            raise CannotTakePart(f"this device's samples have shape {sample_shape}, but the "
                                 f"federation's {spec.name!r} model takes samples of shape "
                                 f"{spec.input_shape}")
        data = LocalData(data.train_x.reshape(-1, *spec.input_shape), data.train_y,
                         data.val_x.reshape(-1, *spec.input_shape), data.val_y,
                         data.class_names)
    _check_labels(spec, np.concatenate([data.train_y, data.val_y]))
    return data


def _tokenized(spec: ModelSpec, data: LocalData) -> LocalData:
    if spec.pretrained is None or spec.base_folder is None:
        raise CannotTakePart(f"this device holds texts, but the federation's {spec.name!r} "
                             f"model takes samples of shape {spec.input_shape}")
    from fedge.models.hf import encode, load_tokenizer

    tokenizer = load_tokenizer(Path(spec.base_folder), spec.input_shape[0])
    return LocalData(encode(tokenizer, data.train_x), data.train_y,
                     encode(tokenizer, data.val_x), data.val_y, data.class_names)


def _check_labels(spec: ModelSpec, labels: np.ndarray) -> None:
    """Labels the federation's task can learn from: class ids among its classes, or rows
    of one value per label (multilabel) or target (regression)."""
    per_row = spec.task in ("multilabel", "regression")
    if per_row != (labels.ndim == 2):
        kind = "rows of values" if labels.ndim == 2 else "class ids"
        raise CannotTakePart(f"the federation learns a {spec.task} task, but this device read "
                             f"its labels as {kind}: start fedge client with --task {spec.task}")
    if per_row:
        if labels.shape[1] != spec.num_classes:
            what = "labels" if spec.task == "multilabel" else "targets"
            raise CannotTakePart(f"this device's samples have {labels.shape[1]} {what}, but "
                                 f"the federation's model has {spec.num_classes}")
        return
    outside = labels[(labels < 0) | (labels >= spec.num_classes)]
    if outside.size:
        raise CannotTakePart(f"{outside.size} of this device's {labels.size} samples have "
                             f"labels outside the federation's {spec.num_classes} classes "
                             f"(0..{spec.num_classes - 1}), e.g. {int(outside[0])}")


def _in_federation_ids(spec: ModelSpec, data: LocalData) -> LocalData:
    """A device's named labels (``scratch``, ``good``) as the federation's class ids, and
    its named label or target columns in the federation's order."""
    if data.class_names is None or data.class_names == spec.class_names:
        return data
    try:
        train_y, val_y = (remap_labels(y, data.class_names, spec.class_names, "this device")
                          for y in (data.train_y, data.val_y))
    except FedgeError as error:
        raise CannotTakePart(str(error)) from error
    return LocalData(data.train_x, train_y, data.val_x, val_y, spec.class_names)


def federation_model(config: dict, base_folder: Path | None = None
                     ) -> tuple[ModelSpec, nn.Module]:
    """The model the server's train config describes: a built-in network, your own as a
    program (no source code, nothing that runs Python), or a pretrained model over this
    device's copy of its base at ``base_folder``; a device that cannot build it (an unknown
    model, from a newer fedge; another base model) cannot take part in any round."""
    try:
        spec = ModelSpec.from_json(str(config[MODEL_SPEC]))
        if spec.pretrained is not None:
            spec = spec.model_copy(update={
                "base_folder": None if base_folder is None else str(base_folder)})
        elif not spec.builtin:
            program = config.get(PROGRAM_KEY)
            if not isinstance(program, bytes):
                raise FedgeError(f"the server sent no program for model {spec.name}")
            spec = spec.model_copy(update={"program": program})
        return spec, build_model(spec)
    except FedgeError as error:
        raise CannotTakePart(f"this device cannot build the federation's model: {error}"
                             ) from error


Trainer = Callable[[RecordDict, Context], RecordDict]


def start_training(content: RecordDict, context: Context, load_data: DataLoaderFn,
                   base_folder: Path | None = None
                   ) -> tuple[ModelSpec, nn.Module, LocalData, LocalTraining, set[str]]:
    """What a train message asks of this node: the model holding the global weights
    (frozen entries not trainable), the node's samples fitted to it, the round's
    settings (seeded for this node and round), and the frozen entries. A pretrained
    model's base is this node's copy at ``base_folder``."""
    config = content[CONFIG]
    spec, model = federation_model(config, base_folder)
    data = fit_to_model(spec, load_data(context))
    model.load_state_dict(content[ARRAYS].to_torch_state_dict())
    frozen = frozen_from_config(config)
    for name, parameter in model.named_parameters():  # a LoRA model's base stays frozen too
        if name in frozen:
            parameter.requires_grad_(False)
    return spec, model, data, training_settings(config, context), frozen


def training_settings(config: dict, context: Context) -> LocalTraining:
    """The train config's local-training settings, seeded for this node and round."""
    return local_training_from_config(
        config, node_seed(int(config[SEED]), int(config[SERVER_ROUND]), context))


def client_key(context: Context) -> int:
    """This client's stable key in per-client metrics: its partition id in a simulation,
    else its node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def train_reply(state: dict, frozen: set[str], num_examples: int, report: TrainReport,
                train_seconds: float, key: int) -> RecordDict:
    """The train reply's records: the trained entries of ``state`` (CPU tensors by name,
    in the model's order) that travel back, and the local-training metrics: the task's
    measures on the local validation split (``val_*``, those it defines), and ``key``."""
    metrics = MetricRecord({
        WEIGHT_KEY: num_examples,
        "train_loss": report.train_loss,
        "val_loss": report.val_loss,
        **{f"val_{name}": value for name, value in report.val_measures.items()
           if value is not None},
        "epochs": report.epochs,
        "stopped_early": int(report.stopped_early),
        "train_seconds": train_seconds,
        CLIENT_KEY: key,
    })
    sent = exchanged_names({name: value.numpy().dtype for name, value in state.items()},
                           frozen)
    return RecordDict({ARRAYS: ArrayRecord({name: state[name] for name in sent}),
                       METRICS: metrics})


def build_trainer(load_data: DataLoaderFn, device: str = default("device"),
                  base_folder: Path | None = None,
                  tracking: LocalTracking | None = None) -> Trainer:
    """Train on the samples ``load_data`` returns for the node, on ``device`` unless the
    node config names one: the records of a train message in, the reply's records out.
    ``base_folder``: this node's copy of a pretrained model's folder; ``tracking``: the
    device's own trackers, which hear every epoch and round here."""

    def train(content: RecordDict, context: Context) -> RecordDict:
        spec, model, data, settings, frozen = start_training(content, context, load_data,
                                                             base_folder)
        chosen = pick_device(str(context.node_config.get("device", device)))
        server_round = int(content[CONFIG][SERVER_ROUND])
        on_epoch = (tracking.round_started(server_round, settings.training)
                    if tracking else None)
        started = time.perf_counter()
        report = train_locally(model, spec, data, settings, chosen, on_epoch)
        train_seconds = time.perf_counter() - started
        if tracking:
            tracking.round_done(server_round, report, train_seconds)
        return train_reply(model.cpu().state_dict(), frozen, len(data.train_x), report,
                           train_seconds, client_key(context))

    return train


def build_client_app(load_data: DataLoaderFn, device: str = default("device"),
                     mods: Sequence[Mod] = (), base_folder: Path | None = None) -> ClientApp:
    """A ClientApp that trains in its own process (simulation), through Flower ``mods``."""
    app = ClientApp(mods=list(mods))
    trainer = build_trainer(load_data, device, base_folder)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(trainer(msg.content, context), reply_to=msg)

    return app
