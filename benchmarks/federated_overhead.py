"""Federated overhead: a simulation of 10 clients vs centralized training of the same
samples for the same epochs, with the same model. Goal: the simulation's rounds ≤ 1.25×
the centralized time.

The simulation (in-process backend, iid digits, every round run: global and local early
stopping are out of reach) trains ``rounds × local_epochs`` epochs over the clients'
training samples in total; the centralized run trains the union of those samples for as
many epochs with fedge's own ``train_locally``, validating on the union of the clients'
validation samples. Both run in this one invocation on one CPU device (the machine is
noisy: compare the ratio, not the seconds), after a warm-up that pays torch's lazy imports
(the first optimizer imports ``torch._dynamo``) so neither side pays them.

A third run separates what federation costs by itself from what fedge and Flower add: the
same clients' ``train_locally`` calls, one after another, and a weighted average of their
weights after every round, with no Flower, no server evaluation and no files.

    python benchmarks/federated_overhead.py [--clients 10] [--rounds 10] [--local-epochs 5]
        [--workers 1] [--vectorize]

The simulation trains with ``--workers`` processes (default 1: in this process, one
client after another, as the other two runs do; more let it use more cores than they do).
``--vectorize`` adds the same simulation with vectorized clients (every round's clients
trained together by ``torch.func.vmap``), side by side: each of its steps trains all the
clients, so it can beat the centralized run's wall time on the same samples and epochs.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedge.client.data import LocalData
from fedge.client.training import LocalTraining, train_locally
from fedge.config import RunConfig
from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import build_model
from fedge.server.federation import Federation
from fedge.simulations.runner import plan_simulation, simulate


def union_of_clients(plan) -> LocalData:
    clients = plan.clients
    parts = [clients.local_data(_Context(i)) for i in range(clients.num_clients)]
    return LocalData(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("train_x", "train_y", "val_x", "val_y")))


class _Context:
    """The one field of a Flower Context that ``SimulatedClients.local_data`` reads."""

    def __init__(self, partition_id: int) -> None:
        self.node_config = {"partition-id": partition_id}


def federated(config: RunConfig, folder: Path) -> dict:
    started = time.perf_counter()
    plan = plan_simulation(config)
    outcome = simulate(plan, folder / "run")
    wall = time.perf_counter() - started
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    return {"wall": wall, "accuracy": outcome.test_accuracy, "rounds": len(rounds),
            "federation": metrics["seconds"],
            "round_seconds": sum(r["seconds"] for r in rounds),
            "slowest_client": sum(r["slowest_client_seconds"] or 0.0 for r in rounds),
            "epochs": sum((r["client_epochs"] or 0.0) for r in rounds) / len(rounds)}


def centralized(config: RunConfig) -> dict:
    started = time.perf_counter()
    plan = plan_simulation(config)
    data = union_of_clients(plan)
    # The same model definition, input scaling included, as the federation's.
    spec = Federation(plan.config, plan.server_data, Path("unused")).spec
    torch.manual_seed(config.seed)
    model = build_model(spec)
    epochs = config.strategy.rounds * config.training.local_epochs
    report = train_locally(model, spec, data, LocalTraining(
        config.training.model_copy(update={"local_epochs": epochs, "local_patience": epochs + 1}),
        seed=config.seed), torch.device("cpu"))
    _, accuracy = evaluate_classifier(model, spec, plan.server_data.test_x,
                                      plan.server_data.test_y)
    return {"wall": time.perf_counter() - started, "accuracy": accuracy,
            "epochs": report.epochs, "samples": len(data.train_y)}


def clients_without_flower(config: RunConfig) -> dict:
    """FedAvg by hand: every client trains from the global weights, the server averages
    them weighted by training samples; nothing else."""
    plan = plan_simulation(config)
    parts = [plan.clients.local_data(_Context(i)) for i in range(plan.clients.num_clients)]
    spec = Federation(plan.config, plan.server_data, Path("unused")).spec
    torch.manual_seed(config.seed)
    model = build_model(spec)
    started = time.perf_counter()
    for server_round in range(config.strategy.rounds):
        states, weights = [], []
        for client, data in enumerate(parts):
            model_k = build_model(spec)
            model_k.load_state_dict(model.state_dict())
            train_locally(model_k, spec, data, LocalTraining(
                config.training.model_copy(
                    update={"local_patience": config.training.local_epochs + 1}),
                seed=config.seed + 1000 * server_round + client), torch.device("cpu"))
            states.append(model_k.state_dict())
            weights.append(len(data.train_y))
        total = sum(weights)
        model.load_state_dict({name: sum(w / total * s[name].float() for w, s in
                                         zip(weights, states, strict=True)).to(value.dtype)
                               for name, value in model.state_dict().items()})
    seconds = time.perf_counter() - started
    _, accuracy = evaluate_classifier(model, spec, plan.server_data.test_x,
                                      plan.server_data.test_y)
    return {"wall": seconds, "accuracy": accuracy}


def warm_up() -> float:
    started = time.perf_counter()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1,
                        help="the simulation's worker processes (1: train in this process)")
    parser.add_argument("--vectorize", action="store_true",
                        help="also run the simulation with vectorized clients")
    args = parser.parse_args()
    config = RunConfig(dataset="digits", clients=args.clients, min_clients=args.clients,
                       workers=args.workers,
                       partition="iid", rounds=args.rounds, local_epochs=args.local_epochs,
                       patience=args.rounds + 1, local_patience=args.local_epochs + 1,
                       device="cpu", seed=0)
    warm_up_seconds = warm_up()
    with tempfile.TemporaryDirectory() as folder:
        fed = federated(config, Path(folder))
    vectorized = None
    if args.vectorize:
        with tempfile.TemporaryDirectory() as folder:
            vectorized = federated(config.updated(**{"vectorize": True}),
                                   Path(folder))
    central = centralized(config)
    by_hand = clients_without_flower(config)
    ratio = fed["wall"] / central["wall"]
    print(f"\ndigits, {args.clients} iid clients, {fed['rounds']} rounds × "
          f"{args.local_epochs} local epochs vs centralized {central['epochs']} epochs on the "
          f"same {central['samples']} training samples; torch threads "
          f"{torch.get_num_threads()}")
    print(f"warm-up (torch's lazy imports, paid once by whichever trains first): "
          f"{warm_up_seconds:.2f} s")
    print("| run | seconds | test accuracy | ratio to centralized |")
    print("|---|---:|---:|---:|")
    print(f"| centralized train_locally | {central['wall']:.2f} | {central['accuracy']:.4f} "
          "| 1.00× |")
    print(f"| the clients' train_locally one after another + FedAvg by hand (no Flower) | "
          f"{by_hand['wall']:.2f} | {by_hand['accuracy']:.4f} | "
          f"{by_hand['wall'] / central['wall']:.2f}× |")
    # The goal is on the rounds, the federation's own cost; the whole call adds what a
    # run pays once (planning, the final test, the ONNX export and its imports, the plot).
    rounds_ratio = fed["round_seconds"] / central["wall"]
    verdict = "met" if rounds_ratio <= 1.25 else "missed"
    print(f"| fedge simulate: its rounds (sum of `seconds` in metrics.json) | "
          f"{fed['round_seconds']:.2f} | | {rounds_ratio:.2f}× (goal ≤ 1.25× {verdict}) |")
    print(f"| fedge simulate (in-process, {args.workers} worker(s)), whole call | "
          f"{fed['wall']:.2f} | {fed['accuracy']:.4f} | {ratio:.2f}× |")
    if vectorized is not None:
        print(f"| fedge simulate --vectorize, its rounds | {vectorized['round_seconds']:.2f} "
              f"| | {vectorized['round_seconds'] / central['wall']:.2f}× |")
        print(f"| fedge simulate --vectorize, whole call | {vectorized['wall']:.2f} | "
              f"{vectorized['accuracy']:.4f} | {vectorized['wall'] / central['wall']:.2f}× |")
    print("\nwhere the simulation's time went (seconds, from metrics.json)")
    print("| part | seconds | share of wall |")
    print("|---|---:|---:|")
    parts = {
        "rounds (sum of `seconds`: clients + server evaluation + checkpoint)":
            fed["round_seconds"],
        "  of which slowest client's training (sum of `slowest_client_seconds`)":
            fed["slowest_client"],
        "federation `seconds` (rounds + start)": fed["federation"],
        "plan + final test + ONNX export + plot (wall − `seconds`)":
            fed["wall"] - fed["federation"],
    }
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {seconds / fed['wall']:.0%} |")


if __name__ == "__main__":
    main()
