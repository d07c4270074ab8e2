"""Update compression on the wire: bytes a client sends per round, and what it costs in
accuracy.

The same simulated federation (digits, ``cnn``, Dirichlet(0.5) label skew, every round
run, fixed seeds) runs uncompressed and with ``--compress fp16`` and ``int8`` side by
side in one invocation. Bytes are ``bytes_per_client`` from metrics.json (the serialised
arrays of a reply, averaged over clients and rounds); accuracy is the best round's test
accuracy, averaged over the seeds; the change is in percentage points against ``none``.

    python benchmarks/wire_compression.py [--clients 10] [--rounds 10] [--seeds 5]
"""

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from fedge.config import RunConfig
from fedge.simulations.runner import plan_simulation, simulate

SCHEMES = ("none", "fp16", "int8")


def run(root: Path, scheme: str, clients: int, rounds: int, seed: int) -> tuple[float, float]:
    """Mean bytes per client per round, and the test accuracy, of one run."""
    config = RunConfig(dataset="digits", clients=clients, rounds=rounds, patience=rounds,
                       seed=seed, compress=scheme)
    run_dir = root / f"{scheme}-{seed}"
    outcome = simulate(plan_simulation(config), run_dir)
    records = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    return statistics.mean(r["bytes_per_client"] for r in records), outcome.test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N−1")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # Flower's per-round logs would bury the table
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            for scheme in SCHEMES:
                results.setdefault(scheme, []).append(
                    run(Path(root), scheme, args.clients, args.rounds, seed))
    sizes = {s: statistics.mean(b for b, _ in r) for s, r in results.items()}
    accuracies = {s: statistics.mean(a for _, a in r) for s, r in results.items()}
    print(f"digits, cnn, {args.clients} clients, {args.rounds} rounds, "
          f"seeds 0–{args.seeds - 1}\n")
    print("| compression | bytes per client per round | ratio vs none | test accuracy "
          "| accuracy change (points) |")
    print("|---|---:|---:|---:|---:|")
    for scheme in SCHEMES:
        print(f"| {scheme} | {sizes[scheme]:,.0f} | {sizes[scheme] / sizes['none']:.3f}× "
              f"| {accuracies[scheme]:.4f} "
              f"| {100 * (accuracies[scheme] - accuracies['none']):+.2f} |")


if __name__ == "__main__":
    main()
