"""fedge vs plain Flower: the same model, data and local training, timed launch to exit.

"Plain Flower" is the federation written the way Flower's quickstart-pytorch writes it
and run on Flower's simulation engine (Ray): a ClientApp that builds the model and a
DataLoader for every message and trains for the local epochs, a ServerApp that runs
Flower's FedAvg with a central ``evaluate_fn`` every round. It trains fedge's network
(same input scaling) on fedge's partitions of the same data with the same optimizer,
learning rate, batch size, rounds and local epochs, and tests the final model.

fedge runs ``fedge simulate`` with the same settings, its local and global early stopping
out of reach, so that both train the same epochs; fedge does more on top (local
validation every epoch, a checkpoint and metrics.json every round, the ONNX export and
its parity check, the plot). Both the in-process backend (the default) and fedge on Ray
are timed. Every configuration runs as a fresh process, one after the other, in this one
invocation (compare ratios: the machine is noisy). Goal: fedge ≤ 0.5× plain Flower.

    python benchmarks/vs_plain_flower.py [--clients 10] [--rounds 10] [--local-epochs 2]
        [--workers 1 2] [--vectorize]

``--workers``: time the in-process backend once per worker count given (default: once,
with fedge's default, the machine's cores). ``--vectorize``: also time the in-process
backend with vectorized clients (``fedge simulate --vectorize``), side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"dataset": "digits", "partition": "iid", "batch_size": 32, "lr": 0.003,
            "seed": 0}


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def plain_flower(clients: int, rounds: int, local_epochs: int, result: Path) -> None:
    """The plain Flower federation, run in this process on Flower's Ray engine."""
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from torch.utils.data import DataLoader, TensorDataset

    from fedge.config import RunConfig
    from fedge.models.registry import as_input_tensor, build_model, spec_from_data
    from fedge.simulations.runner import plan_simulation

    plan = plan_simulation(RunConfig(clients=clients, **SETTINGS))
    data = plan.server_data
    spec = spec_from_data(plan.config.model.name, data.val_x, data.num_classes,
                          plan.config.model.dropout)

    def accuracy(model: torch.nn.Module, x, y) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(as_input_tensor(spec, x))
            labels = torch.as_tensor(y)
            return (F.cross_entropy(logits, labels).item(),
                    (logits.argmax(1) == labels).float().mean().item())

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        model = build_model(spec)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        local = plan.clients.local_data(context)
        loader = DataLoader(TensorDataset(as_input_tensor(spec, local.train_x),
                                          torch.as_tensor(local.train_y)),
                            batch_size=SETTINGS["batch_size"], shuffle=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=msg.content["config"]["lr"])
        model.train()
        for _ in range(local_epochs):
            for inputs, labels in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), labels).backward()
                optimizer.step()
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(local.train_y)}),
        })
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(SETTINGS["seed"])
        model = build_model(spec)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = accuracy(model, data.val_x, data.val_y)
            return MetricRecord({"val_loss": loss, "val_accuracy": acc})

        outcome = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
            train_config=ConfigRecord({"lr": SETTINGS["lr"]}), evaluate_fn=evaluate)
        model.load_state_dict(outcome.arrays.to_torch_state_dict())
        _, test_accuracy = accuracy(model, data.test_x, data.test_y)
        result.write_text(json.dumps({"test_accuracy": test_accuracy}))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


def fedge_command(backend: str, clients: int, rounds: int, local_epochs: int,
                  out: Path, workers: int | None = None, vectorize: bool = False
                  ) -> list[str]:
    chosen = ([] if workers is None else ["--workers", str(workers)]) + (
        ["--vectorize"] if vectorize else [])
    return [sys.executable, "-m", "fedge", "simulate", "--backend", backend, *chosen,
            "--dataset", SETTINGS["dataset"], "--partition", SETTINGS["partition"],
            "--clients", str(clients), "--min-clients", str(clients),
            "--rounds", str(rounds), "--local-epochs", str(local_epochs),
            "--batch-size", str(SETTINGS["batch_size"]), "--lr", str(SETTINGS["lr"]),
            "--seed", str(SETTINGS["seed"]), "--patience", str(rounds + 1),
            "--local-patience", str(local_epochs + 1), "--device", "cpu",
            "--out", str(out)]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=environment(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])}... failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[None],
                        help="in-process worker counts to time (default: fedge's default)")
    parser.add_argument("--vectorize", action="store_true",
                        help="also time the in-process backend with --vectorize")
    parser.add_argument("--plain-flower-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_flower_result:  # the child process that runs plain Flower
        plain_flower(args.clients, args.rounds, args.local_epochs, args.plain_flower_result)
        return
    workload = (args.clients, args.rounds, args.local_epochs)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        plain_result = folder / "plain.json"
        rows = {"plain Flower (Ray)": (
            timed([sys.executable, __file__, "--clients", str(args.clients), "--rounds",
                   str(args.rounds), "--local-epochs", str(args.local_epochs),
                   "--plain-flower-result", str(plain_result)]),
            json.loads(plain_result.read_text())["test_accuracy"])}
        runs = [("inprocess", workers, False) for workers in args.workers]
        runs += [("inprocess", None, True)] * args.vectorize + [("ray", None, False)]
        for backend, workers, vectorize in runs:
            out = folder / f"{backend}-{workers}-{vectorize}"
            seconds = timed(fedge_command(backend, *workload, out, workers, vectorize))
            metrics = json.loads((out / "metrics.json").read_text())
            name = f"fedge simulate --backend {backend}" + (
                "" if workers is None else f" --workers {workers}") + (
                " --vectorize" if vectorize else "")
            rows[name] = (seconds, metrics["test"]["accuracy"])
    baseline = rows["plain Flower (Ray)"][0]
    print(f"\ndigits, {args.clients} iid clients, {args.rounds} rounds × "
          f"{args.local_epochs} local epochs, seconds from launch to exit")
    print("| run | wall s | ratio to plain Flower | test accuracy |")
    print("|---|---:|---:|---:|")
    for name, (seconds, test_accuracy) in rows.items():
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f}× | {test_accuracy:.4f} |")
    ratio = min(seconds for name, (seconds, _) in rows.items()
                if "inprocess" in name) / baseline
    print(f"\ngoal: fedge ≤ 0.5× plain Flower: {'met' if ratio <= 0.5 else 'missed'} "
          f"({ratio:.2f}×)")


if __name__ == "__main__":
    main()
