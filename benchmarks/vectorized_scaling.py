"""Vectorized clients at scale: rounds per second and peak memory with 10, 100 and 1,000
clients per round, vectorized (``--vectorize``) vs one client after another.

Every client holds the same number of samples (``--samples-per-client`` training and
validation samples: digits, tiled with a little noise so that 1,000 clients have enough),
and every client of the federation trains in every round. Each configuration runs in a
fresh process (``fedge.simulate``, in-process backend, one worker: the sequential side
trains in that process, as the vectorized side does), so that its peak resident memory
(``resource.getrusage``'s ``ru_maxrss``) is its own. Rounds per second come from the
rounds' ``seconds`` in metrics.json (clients' training + server evaluation + checkpoint),
after the first round (which pays torch's lazy imports and the first batch's set-up).

    python benchmarks/vectorized_scaling.py [--sizes 10 100 1000] [--sequential-up-to 100]
        [--rounds 3] [--local-epochs 1] [--samples-per-client 40] [--device cpu]

Sequential runs are timed only for sizes up to ``--sequential-up-to`` (1,000 clients one
by one take long); the ratio column is vectorized rounds/s over sequential rounds/s.
Numbers measured on a loaded machine are noise: compare ratios from one invocation.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(clients: int, vectorize: bool, args: argparse.Namespace) -> None:
    """One configuration, in this process; prints its measurements as one JSON line."""
    import numpy as np

    import fedge
    from fedge.simulations.datasets import load_dataset

    digits = load_dataset("digits")
    # Clients get 70% of the samples (the server keeps 15% + 15%).
    total = int(np.ceil(clients * args.samples_per_client / 0.7))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(digits.y), total)
    x = (digits.x[rows] + rng.normal(0, 0.5, digits.x[rows].shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        result = fedge.simulate(
            "cnn", (x, digits.y[rows]), out=Path(folder) / "run", clients=clients,
            min_clients=clients, rounds=args.rounds, local_epochs=args.local_epochs,
            partition="iid", patience=args.rounds + 1, local_patience=args.local_epochs + 1,
            workers=1, vectorize=vectorize, device=args.device, seed=0)
    timed = result.rounds[1:] or result.rounds
    seconds = sum(r["seconds"] for r in timed) / len(timed)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rounds_per_second": 1.0 / seconds, "peak_rss_mib": peak_kib / 1024,
                      "training_seconds": sum(r["slowest_client_seconds"] or 0.0
                                              for r in timed) / len(timed)
                      if vectorize else None,
                      "val_accuracy": result.rounds[-1]["val_accuracy"]}))


def measure(clients: int, vectorize: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(clients), "--rounds", str(args.rounds),
               "--local-epochs", str(args.local_epochs), "--samples-per-client",
               str(args.samples_per_client), "--device", args.device]
    command += ["--vectorize"] if vectorize else []
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{clients} clients (vectorize={vectorize}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000],
                        help="clients per round to time")
    parser.add_argument("--sequential-up-to", type=int, default=100,
                        help="time sequential training for sizes up to this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--samples-per-client", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vectorize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.vectorize, args)
        return
    print(f"digits (tiled), {args.samples_per_client} samples per client, {args.rounds} "
          f"rounds × {args.local_epochs} local epochs, device {args.device}")
    print("| clients per round | vectorized rounds/s | peak RSS MiB | sequential rounds/s "
          "| peak RSS MiB | speed-up | val accuracy (vec / seq) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.sizes:
        vec = measure(clients, True, args)
        seq = measure(clients, False, args) if clients <= args.sequential_up_to else None
        cells = [f"{vec['rounds_per_second']:.3f}", f"{vec['peak_rss_mib']:.0f}"]
        if seq is None:
            cells += ["–", "–", "–", f"{vec['val_accuracy']:.3f} / –"]
        else:
            cells += [f"{seq['rounds_per_second']:.3f}", f"{seq['peak_rss_mib']:.0f}",
                      f"{vec['rounds_per_second'] / seq['rounds_per_second']:.1f}×",
                      f"{vec['val_accuracy']:.3f} / {seq['val_accuracy']:.3f}"]
        print(f"| {clients} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
