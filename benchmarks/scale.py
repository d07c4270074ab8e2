"""Scale in simulation: 100 / 1,000 / 10,000 registered clients, 10 % sampled per round.

Every configuration runs in a fresh subprocess, so its peak RSS is its own. All of them
share one data set: SYNTHETIC sensor windows (the ``synthetic-sensor`` generator, with
``--samples`` windows instead of its default 1,600), split ``iid``. Digits has only
1,797 samples, too few for 10,000 clients with ≥ 2 samples each; a fixed data set also
keeps the samples trained per round the same in every configuration, so what changes is
only the number of clients. Goal: 1,000 clients under 1.5 GiB, flat in client count.

Seconds per round is the mean wall time of the rounds after the first; the first round
also holds the partitioning of the data and every one-off start-up cost.

    python benchmarks/scale.py [--clients 100 1000 10000] [--rounds 3] [--samples 30000]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from itertools import pairwise
from pathlib import Path

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
SCALE_DATASET = "synthetic-sensor-scale"


def measure(clients: int, rounds: int, samples: int, fraction: float) -> dict:
    """One configuration in this process: round wall times and this process's peak RSS."""
    from fedge.config import RunConfig
    from fedge.simulations.datasets import DATASETS, _synthetic_sensor
    from fedge.simulations.runner import plan_simulation, simulate

    DATASETS[SCALE_DATASET] = partial(_synthetic_sensor, samples=samples)
    config = RunConfig(dataset=SCALE_DATASET, clients=clients, fraction=fraction,
                       min_clients=2, rounds=rounds, local_epochs=1, partition="iid",
                       patience=rounds + 1, seed=0)
    started = time.perf_counter()
    plan = plan_simulation(config)
    plan_seconds = time.perf_counter() - started
    ends: list[float] = []
    sampled: list[int] = []

    def on_round(record, _best: bool) -> None:
        ends.append(time.perf_counter())
        sampled.append(record.num_clients)

    with tempfile.TemporaryDirectory() as folder:
        round_start = time.perf_counter()
        simulate(plan, Path(folder) / "run", on_round=on_round)
    durations = [b - a for a, b in pairwise([round_start, *ends])]
    return {"clients": clients, "sampled": max(sampled), "plan_seconds": plan_seconds,
            "first_round_seconds": durations[0],
            "seconds_per_round": sum(durations[1:]) / max(1, len(durations) - 1),
            # Linux reports ru_maxrss in KiB.
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_subprocess(clients: int, args: argparse.Namespace) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--one", str(clients), "--rounds", str(args.rounds),
         "--samples", str(args.samples), "--fraction", str(args.fraction)],
        capture_output=True, text=True, env={**os.environ, **FLOWER_ENV}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{clients} clients failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30_000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one configuration
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.rounds, args.samples, args.fraction)))
        return
    print(f"SYNTHETIC sensor data, {args.samples} windows, iid; fraction {args.fraction}, "
          f"{args.rounds} rounds, local_epochs=1\n")
    print("| clients | sampled per round | s per round | first round s | plan s "
          "| peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        row = measure_in_subprocess(clients, args)
        print(f"| {row['clients']:,} | {row['sampled']:,} | {row['seconds_per_round']:.2f} "
              f"| {row['first_round_seconds']:.2f} | {row['plan_seconds']:.2f} "
              f"| {row['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
