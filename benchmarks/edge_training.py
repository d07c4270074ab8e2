"""What training on a device without Python costs: `fedge-device` (ExecuTorch) against
eager PyTorch (what `fedge client` runs), side by side, on the same samples.

For each built-in model, on its real or synthetic data set: the server's export of the
device programs (seconds, bytes), one local epoch in `fedge-device --local` and in eager
torch with the same batch size and optimizer (seconds per epoch, and their ratio), the
device process's peak memory, and the bytes a device moves per round (the weights it
downloads, the result it uploads; the programs once per run). Also the binary's size and
the ExecuTorch libraries it loads.

    python benchmarks/edge_training.py [--epochs 3] [--batch-size 32] [--build DIR]
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedge.client.device_build import build_device
from fedge.models.blob import pack
from fedge.models.edge import export_edge_programs, write_edge_folder
from fedge.models.registry import as_input_tensor, build_model, spec_from_data
from fedge.simulations.datasets import load_dataset

DATA_OF = {"cnn": "digits", "mlp": "breast_cancer", "sensor1d": "synthetic-sensor",
           "tinytext": "synthetic-text"}


def eager_seconds_per_epoch(model: torch.nn.Module, spec, x: np.ndarray, y: np.ndarray,
                            batch_size: int, epochs: int) -> float:
    """Adam over mini-batches, as fedge's local training runs them (no evaluation)."""
    inputs, labels = as_input_tensor(spec, x), torch.as_tensor(y, dtype=torch.int64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(batch_size):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - started) / epochs


def measure(name: str, binary: Path, folder: Path, epochs: int, batch_size: int) -> dict:
    data = load_dataset(DATA_OF[name])
    vocab = int(data.x.max()) + 1 if name == "tinytext" else None
    spec = spec_from_data(name, data.x, data.num_classes, 0.2, vocab_size=vocab)
    torch.manual_seed(0)
    model = build_model(spec)
    started = time.perf_counter()
    programs = export_edge_programs(model, spec, data.x[:200], data.y[:200], batch_size)
    export_seconds = time.perf_counter() - started
    write_edge_folder(programs, folder)
    state = model.state_dict()
    weights = pack({}, {e["name"]: state[e["name"]].numpy() for e in programs.manifest["state"]})
    (folder / "weights.bin").write_bytes(weights)
    x = data.x.astype(np.int64 if vocab else np.float32)
    (folder / "local.bin").write_bytes(pack({"format": "fedge-device-data/1",
                                             "class_names": None},
                                            {"x": x, "y": data.y.astype(np.int64)}))
    result = folder / "result.bin"
    run = subprocess.run(
        [str(binary), "--local", str(folder), "--data", str(folder / "local.bin"),
         "--epochs", str(epochs), "--patience", str(epochs), "--batch-size", str(batch_size),
         "--val-fraction", "0.2", "--out", str(result)],
        capture_output=True, text=True, timeout=1800, check=True)
    device = json.loads(run.stdout.strip().splitlines()[-1])
    train_rows = len(data.y) - max(1, round(0.2 * len(data.y)))
    eager = eager_seconds_per_epoch(build_model(spec), spec, data.x[:train_rows],
                                    data.y[:train_rows], batch_size, epochs)
    return {
        "model": name, "samples": train_rows,
        "export_s": export_seconds,
        "program_bytes": len(programs.train) + len(programs.predict),
        "device_epoch_s": device["seconds_per_epoch"], "eager_epoch_s": eager,
        "ratio": device["seconds_per_epoch"] / eager,
        "peak_rss_mib": device["peak_rss_kib"] / 1024,
        "down_bytes": len(weights), "up_bytes": result.stat().st_size,
        "libraries": device["libraries"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--build", type=Path, help="build folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # fedge-device runs the portable kernels on one thread
    with tempfile.TemporaryDirectory() as scratch:
        build = args.build or Path(scratch) / "build"
        started = time.perf_counter()
        binary = build_device(build)
        print(f"built {binary} in {time.perf_counter() - started:.1f} s: "
              f"{binary.stat().st_size / 1024:.0f} KiB")
        rows = [measure(name, binary, Path(scratch) / name, args.epochs, args.batch_size)
                for name in DATA_OF]
    libraries = sorted({lib for row in rows for lib in row["libraries"]
                        if "executorch" in lib or "site-packages" in lib})
    print("ExecuTorch libraries it loads:")
    for lib in libraries:
        print(f"  {lib}  {Path(lib).stat().st_size / 2**20:.1f} MiB"
              if Path(lib).exists() else f"  {lib}")
    print(f"{'model':9} {'samples':>7} {'export s':>8} {'programs':>9} {'device s/ep':>11} "
          f"{'eager s/ep':>10} {'ratio':>6} {'peak MiB':>8} {'down B':>8} {'up B':>8}")
    for r in rows:
        print(f"{r['model']:9} {r['samples']:7d} {r['export_s']:8.1f} {r['program_bytes']:9d} "
              f"{r['device_epoch_s']:11.3f} {r['eager_epoch_s']:10.3f} {r['ratio']:6.1f} "
              f"{r['peak_rss_mib']:8.1f} {r['down_bytes']:8d} {r['up_bytes']:8d}")


if __name__ == "__main__":
    main()
