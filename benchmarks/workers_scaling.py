"""Scaling with workers: rounds per second of one simulation with 1, 2, … worker
processes, up to this machine's cores, and its peak memory.

Every configuration runs in a fresh subprocess (its memory is its own), one after another
in this one invocation: digits, ``--clients`` iid clients, all of them every round, every
round run (global and local early stopping out of reach). Seconds per round is the mean of
the rounds after the first (the first also pays the workers' first optimizer, which
imports ``torch._dynamo``). Memory is the simulation process's peak RSS and its largest
worker's: forked workers share the parent's pages until they write them, so the sum
overstates what the machine holds. ``1`` worker trains in the simulation's own process on
one torch thread, as every worker does.

    python benchmarks/workers_scaling.py [--workers 1 2 4] [--clients 20] [--rounds 5]
        [--local-epochs 2] [--device cpu]

``--device cuda``: the workers share the GPU (each with its own CUDA context).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def measure(workers: int, clients: int, rounds: int, local_epochs: int, device: str) -> dict:
    """One configuration in this process: round wall times and peak RSS."""
    import torch

    from fedge.config import RunConfig
    from fedge.simulations.runner import plan_simulation, simulate

    torch.set_num_threads(1)
    config = RunConfig(dataset="digits", clients=clients, min_clients=clients,
                       partition="iid", rounds=rounds, local_epochs=local_epochs,
                       patience=rounds + 1, local_patience=local_epochs + 1, device=device,
                       workers=workers, seed=0)
    plan = plan_simulation(config)
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        simulate(plan, Path(folder) / "run", on_round=lambda *_: ends.append(
            time.perf_counter()))
    durations = [b - a for a, b in pairwise([started, *ends])]
    later = durations[1:] or durations
    # Linux reports ru_maxrss in KiB; RUSAGE_CHILDREN holds the largest waited-for child.
    return {"workers": workers, "first_round_seconds": durations[0],
            "seconds_per_round": sum(later) / len(later),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mib":
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure_in_subprocess(workers: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", str(workers), "--clients", str(args.clients),
               "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
               "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, **FLOWER_ENV}, check=False)
    if result.returncode != 0:
        sys.exit(f"error: the run with {workers} worker(s) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+",
                        default=sorted({1, *range(2, cores + 1, 2), cores}))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one configuration
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.clients, args.rounds, args.local_epochs,
                                args.device)))
        return
    print(f"digits, {args.clients} iid clients per round, {args.rounds} rounds × "
          f"{args.local_epochs} local epochs, {cores} cores, device {args.device}\n")
    print("| workers | rounds per second | speed-up | first round s | peak RSS MiB "
          "| largest worker RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for workers in args.workers:
        row = measure_in_subprocess(workers, args)
        rate = 1.0 / row["seconds_per_round"]
        baseline = baseline or rate
        worker_rss = f"{row['worker_peak_rss_mib']:.0f}" if workers > 1 else "–"
        print(f"| {workers} | {rate:.2f} | {rate / baseline:.2f}× "
              f"| {row['first_round_seconds']:.2f} | {row['peak_rss_mib']:.0f} "
              f"| {worker_rss} |", flush=True)


if __name__ == "__main__":
    main()
