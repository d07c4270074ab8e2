"""An edge gateway's side toward the federation: one node whose training devices do.

To the server, ``fedge gateway`` is one client like ``fedge client``: a SuperNode with
TLS and node authentication (:func:`fedge.client.deployment.run_node`). Each train
message it gets becomes a task for the ExecuTorch devices behind it: the run's device
programs (which the server exports, ``--edge-programs``), the global weights and the
round's training settings. Whoever serves the devices (``run_round``, see
``fedge.server.gateway``) returns their results averaged by examples; the reply is that
average, weighted by the devices' total examples, so the server's FedAvg over clients
and gateways is FedAvg over every client and device (hierarchical aggregation).
"""

import json
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict

from fedge.client.app import CannotTakePart, local_training_from_config
from fedge.client.data import node_seed
from fedge.client.relay import Trainer
from fedge.errors import FedgeError
from fedge.protocol import (
    ARRAYS,
    CONFIG,
    DEVICE_TRAINING,
    EDGE_MANIFEST_KEY,
    EDGE_PREDICT_KEY,
    EDGE_TRAIN_KEY,
    METRICS,
    PROXIMAL_MU,
    SEED,
    SERVER_ROUND,
    WEIGHT_KEY,
)


class DeviceRound(Protocol):
    """What one round on the devices gives back (``fedge.server.gateway.RoundResult``)."""

    arrays: Mapping[str, np.ndarray]
    num_examples: int
    metrics: Mapping[str, float]


RunRound = Callable[[int, dict, dict[str, bytes], dict[str, np.ndarray], dict], DeviceRound]


def device_task(config: Mapping[str, object]) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the programs (by SHA-256) of a train config, or why a gateway
    cannot take part: a server without ``--edge-programs`` sends none."""
    manifest, train, predict = (config.get(key) for key in
                                (EDGE_MANIFEST_KEY, EDGE_TRAIN_KEY, EDGE_PREDICT_KEY))
    if not (isinstance(manifest, str) and isinstance(train, bytes)
            and isinstance(predict, bytes)):
        raise CannotTakePart("the server sends no device programs: start it with "
                             "--edge-programs (edge-programs = true), which needs "
                             "pip install 'fedge[edge]' on the server")
    manifest = json.loads(manifest)
    programs = manifest["programs"]
    return manifest, {programs["train"]["sha256"]: train,
                      programs["predict"]["sha256"]: predict}


def training_settings(config: Mapping[str, object], seed: int) -> dict:
    """The round's local training, read as ``fedge client`` reads it, in the names of the
    device protocol (which a device's program reads)."""
    local = local_training_from_config(config, seed)
    read = {**local.training.as_config(), PROXIMAL_MU: local.proximal_mu, SEED: local.seed}
    return {name: read[key] for name, key in DEVICE_TRAINING.items()}


def build_gateway_trainer(run_round: RunRound) -> Trainer:
    """A trainer that hands every train message to the devices through ``run_round``."""

    def train(content: RecordDict, context: Context) -> RecordDict:
        config = content[CONFIG]
        manifest, programs = device_task(config)
        server_round = int(config[SERVER_ROUND])
        # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights: the
        # devices' programs do not take them, and no client sends them back.
        arrays = {name: array.numpy() for name, array in content[ARRAYS].items()
                  if np.dtype(array.dtype).kind == "f"}
        seed = node_seed(int(config[SEED]), server_round, context)
        try:
            result = run_round(server_round, manifest, programs, arrays,
                               training_settings(config, seed))
        except FedgeError as error:  # this round only: the server hears why
            raise RuntimeError(str(error)) from error
        return RecordDict({
            ARRAYS: ArrayRecord({name: Array(np.ascontiguousarray(value))
                                   for name, value in result.arrays.items()}),
            METRICS: MetricRecord({WEIGHT_KEY: int(result.num_examples),
                                     **{k: float(v) for k, v in result.metrics.items()}}),
        })

    return train
