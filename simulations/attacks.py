"""Staged attacks: some simulated clients are Byzantine in every round they are sampled.

round(``byzantine`` · clients) partitions, drawn once from the seed, attack. With
Δ = w_local − w_global, the update an honest client would send, and s = ``attack_scale``:

- ``signflip``:  the client sends w_global − s·Δ (amplified gradient ascent)
- ``scale``:     w_global + s·Δ (one client outweighs all others in an average)
- ``nan``:       every weight NaN (a broken device, or an attempt to poison the average)
- ``labelflip``: trains honestly on labels y → C − 1 − y (data poisoning: the update
  looks ordinary, so the server's norm screen cannot tell it apart)

The first three are a Flower client mod that rewrites the reply of an honest training;
``labelflip`` wraps the clients' data loader. Both backends run the same ClientApp.
"""

from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.client.app import DataLoaderFn
from fedge.client.data import LocalData
from fedge.config import RunConfig
from fedge.errors import FedgeError

ATTACKS = ("signflip", "scale", "nan", "labelflip")


def check_attack(config: RunConfig) -> None:
    """A clear error for an attack that is unknown or has no one to stage it."""
    simulation = config.simulation
    if simulation.attack is None:
        if simulation.byzantine > 0:
            raise FedgeError(f"--byzantine {simulation.byzantine:g} needs an --attack: one of "
                             f"{', '.join(ATTACKS)}")
        return
    if simulation.attack not in ATTACKS:
        raise FedgeError(f"unknown attack {simulation.attack!r}; choose one of: "
                         f"{', '.join(ATTACKS)}")
    attackers, clients = len(attacker_partitions(config)), config.strategy.clients
    if not attackers:
        raise FedgeError(f"attack {simulation.attack!r} needs Byzantine clients, but "
                         f"--byzantine {simulation.byzantine:g} of {clients} clients "
                         "is none; pass a larger --byzantine")
    if attackers == clients:
        raise FedgeError(f"--byzantine {simulation.byzantine:g} of {clients} clients "
                         "makes every client an attacker; leave at least one honest client")


def attacker_partitions(config: RunConfig) -> frozenset[int]:
    """The partition ids of the round(byzantine · clients) attackers, fixed by the seed."""
    clients = config.strategy.clients
    count = round(config.simulation.byzantine * clients)
    chosen = np.random.default_rng(config.seed).choice(clients, count, replace=False)
    return frozenset(int(partition) for partition in chosen)


def describe_attack(config: RunConfig) -> str | None:
    """One line for the start of a run, e.g. 'signflip ×100 by 2 of 10 clients
    (partitions 3, 7)'."""
    simulation = config.simulation
    if simulation.attack is None:
        return None
    attackers = sorted(attacker_partitions(config))
    strength = (f" ×{simulation.attack_scale:g}" if simulation.attack in ("signflip", "scale")
                else "")
    return (f"{simulation.attack}{strength} by {len(attackers)} of {config.strategy.clients} "
            f"clients (partitions {', '.join(map(str, attackers))})")


def staged_attack(config: RunConfig, load_data: DataLoaderFn,
                  num_classes: int) -> tuple[DataLoaderFn, list[Mod]]:
    """The simulated clients' data loader and ClientApp mods, with
    ``config.simulation.attack``."""
    simulation = config.simulation
    if simulation.attack is None:
        return load_data, []
    attackers = attacker_partitions(config)
    if simulation.attack == "labelflip":
        return FlippedLabels(load_data, num_classes, attackers), []
    return load_data, [UpdateAttack(simulation.attack, simulation.attack_scale, attackers)]


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@dataclass(frozen=True)
class FlippedLabels:
    """``load_data`` with every label y of an attacker's samples turned into C − 1 − y."""

    load_data: DataLoaderFn
    num_classes: int
    attackers: frozenset[int]

    def __call__(self, context: Context) -> LocalData:
        data = self.load_data(context)
        if _partition(context) not in self.attackers:
            return data
        top = self.num_classes - 1
        return replace(data, train_y=top - data.train_y, val_y=top - data.val_y)


@dataclass(frozen=True)
class UpdateAttack:
    """A Flower client mod: attackers train honestly, then send a poisoned update."""

    kind: str
    scale: float
    attackers: frozenset[int]

    def __call__(self, message: Message, context: Context,
                 call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if (message.metadata.message_type != MessageType.TRAIN or reply.has_error()
                or _partition(context) not in self.attackers):
            return reply
        # The received content is shared with other clients in one process: read it only.
        (sent,) = message.content.array_records.values()
        ((key, trained),) = reply.content.array_records.items()
        reply.content[key] = ArrayRecord({
            name: Array(self._poison(sent[name].numpy(), array.numpy()))
            for name, array in trained.items()
        })
        return reply

    def _poison(self, global_weights: np.ndarray, local_weights: np.ndarray) -> np.ndarray:
        if self.kind == "nan":
            return np.full_like(local_weights, np.nan)
        direction = -1.0 if self.kind == "signflip" else 1.0
        delta = local_weights - global_weights
        return (global_weights + direction * self.scale * delta).astype(local_weights.dtype)
