"""Cold start: ``fedge simulate`` from launch to its first finished round. Goal: ≤ 5 s.

Launches ``python -m fedge simulate --rounds 1`` (digits, its defaults otherwise) as a
fresh process several times, and times each from launch to its first ``round`` line on
stdout and to its exit; the bare imports it pays for (torch, scikit-learn for the data
sets, Flower's ServerApp, fedge's CLI and simulation runner, and the first optimizer,
which imports ``torch._dynamo``) are timed the same way, as fresh processes, for the
breakdown. All in one
invocation: compare within it (the machine is noisy).

    python benchmarks/cold_start.py [--repeats 3] [--local-epochs 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import sklearn.model_selection": "import sklearn.model_selection",
    "import flwr.serverapp": "import flwr.serverapp",
    "import fedge.cli": "import fedge.cli",
    "import fedge.simulations.runner": "import fedge.simulations.runner",
    "torch's first optimizer": "import torch; torch.optim.Adam([torch.zeros(1)])",
}


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def time_import(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=environment())
    return time.perf_counter() - started


def time_simulate(local_epochs: int, folder: str) -> tuple[float, float]:
    """Seconds to the first round line and to the process's exit."""
    command = [sys.executable, "-m", "fedge", "simulate", "--rounds", "1", "--local-epochs",
               str(local_epochs), "--device", "cpu", "--out", folder, "--overwrite"]
    started = time.perf_counter()
    first_round = float("nan")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=environment(), text=True) as process:
        for line in process.stdout:
            if line.lstrip().startswith("round") and first_round != first_round:
                first_round = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"fedge simulate failed with exit status {process.returncode}")
    return first_round, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=5)
    args = parser.parse_args()
    imports = {name: [time_import(code) for _ in range(args.repeats)]
               for name, code in IMPORTS.items()}
    with tempfile.TemporaryDirectory() as folder:
        runs = [time_simulate(args.local_epochs, os.path.join(folder, "run"))
                for _ in range(args.repeats)]
    first = [r[0] for r in runs]
    exits = [r[1] for r in runs]
    print(f"\nseconds from launch, fresh process each, median (min–max) of {args.repeats}")
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, times in imports.items():
        print(f"| `python -c \"{IMPORTS[name]}\"` | {statistics.median(times):.2f} | "
              f"{min(times):.2f} | {max(times):.2f} |")
    label = f"`fedge simulate --rounds 1 --local-epochs {args.local_epochs}`"
    for what, times in ((f"{label} → first round line", first), (f"{label} → exit", exits)):
        print(f"| {what} | {statistics.median(times):.2f} | {min(times):.2f} | "
              f"{max(times):.2f} |")
    verdict = "met" if statistics.median(first) <= 5.0 else "missed"
    print(f"\ngoal ≤ 5 s to the first finished round: {verdict} "
          f"(median {statistics.median(first):.2f} s)")


if __name__ == "__main__":
    main()
