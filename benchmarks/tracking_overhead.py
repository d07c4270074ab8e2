"""What tracking costs: the same ``fedge simulate`` run with no tracker, with MLflow's local
store (``--track mlflow``), with an MLflow tracking server on 127.0.0.1 (``--track
mlflow:http://...``), and with TensorBoard, each a fresh process, alternating, in one
invocation. Prints the mean and median seconds per round (``rounds[].seconds`` in metrics.json:
training and evaluation, where a tracker that held up a round would show) and the wall
time from launch to exit (which includes the tracker's start and its last writes: the
artifacts and the ONNX model as an MLflow model).

    python benchmarks/tracking_overhead.py [--rounds 10] [--repeats 2]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def environment() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    from fedge.processes import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        env=environment(), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return server, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the MLflow server did not start")


def run(track: list[str], rounds: int, folder: Path) -> tuple[float, float, float]:
    out = folder / f"run{len(list(folder.iterdir()))}"
    args = [sys.executable, "-m", "fedge", "simulate", "--rounds", str(rounds),
            "--clients", "4", "--local-epochs", "1", "--partition", "iid",
            "--patience", str(rounds), "--out", str(out)]
    for target in track:
        args += ["--track", target]
    started = time.perf_counter()
    subprocess.run(args, env=environment(), check=True, capture_output=True, timeout=900)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = [r["seconds"] for r in metrics["rounds"]]
    return statistics.mean(seconds), statistics.median(seconds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "server").mkdir()
        (root / "runs").mkdir()
        server, uri = start_mlflow_server(root / "server")
        try:
            setups = {"no tracker": [], "mlflow (local store)": ["mlflow"],
                      "mlflow (server)": [f"mlflow:{uri}"], "tensorboard": ["tensorboard"]}
            found: dict[str, list[tuple[float, float, float]]] = {name: [] for name in setups}
            for _ in range(options.repeats):
                for name, track in setups.items():
                    found[name].append(run(track, options.rounds, root / "runs"))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    def mean(results: list[tuple[float, float, float]], column: int) -> float:
        return statistics.mean(result[column] for result in results)

    base = [mean(found["no tracker"], column) for column in range(3)]
    print(f"digits, 4 clients, {options.rounds} rounds x 1 local epoch, "
          f"{options.repeats} runs each (fresh processes, alternating)")
    print(f"{'tracking':<22} {'mean s/round':>12} {'median s/round':>14} {'wall s':>7}")
    for name, results in found.items():
        cells = [(mean(results, c), mean(results, c) - base[c]) for c in range(3)]
        print(f"{name:<22} {cells[0][0]:6.3f} {cells[0][1]:+.3f} {cells[1][0]:7.3f} "
              f"{cells[1][1]:+.3f} {cells[2][0]:5.1f} {cells[2][1]:+.1f}")


if __name__ == "__main__":
    main()
