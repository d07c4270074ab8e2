"""Asynchronous (FedBuff) vs synchronous (FedAvg) rounds on the simulated clock: digits,
100 clients, 30 % of them 10× slower, 20 % offline per round; simulated time, server steps
and client updates until the global model is within 2 points of centralized training.
Goal: FedBuff on target in ≤ 1/3 of FedAvg's simulated time, at ≤ 1 point lower final
accuracy; with no slow clients (offline ones stay), FedBuff no worse.

Both strategies run with the same settings except what only one of them has: C clients
train at once (FedAvg samples exactly C a round: ``fraction`` C/100 and ``min_clients``
C; FedBuff keeps C busy, ``--concurrency C``), the same deadline (``round_timeout``,
simulated seconds), quarantine, local training, seed and ``samples_per_second``. FedBuff
takes a server step every K results (``--buffer``) with server learning rate η_g and
evaluates after every step (``eval_every`` 1), FedAvg after every round.

Each run gets the same budget of client updates (``--updates``: FedAvg ``updates / C``
rounds, FedBuff ``updates / K`` versions) and runs all of it: global early stopping is out
of reach for both (patience larger than the run), so neither stops before the target. The
target is read from metrics.json afterwards: the first evaluated round (version) whose
``val_accuracy`` on the server's validation split is ≥ centralized − 2 points; its
``elapsed_seconds`` is the simulated time to target, and the updates to target are the
results aggregated in the rounds (versions) up to it. Final accuracy is the **test
accuracy of the run's best model** (lowest validation loss, fedge's own choice of model to
export) at the end of the budget; the best validation accuracy is shown beside it.

Each seed (``--seeds``, default 0, 1, 2) is its own split, fleet and pair of runs, and
the goals are judged on the means over the seeds: one seed's 270 test samples make a
point of accuracy three samples, and a single seed's verdict is decided by a handful.

The reference is ``centralized`` of benchmarks/accuracy_vs_centralized.py: fedge's
``train_locally`` on the union of the 100 clients' samples, to convergence, with fedge's
default learning rate and batch size. The simulated clock makes every number independent
of the machine and its load; one torch thread.

    python benchmarks/async_vs_sync.py [--concurrency 10] [--buffer 5] [--server-lr 1.0]
        [--updates 4000] [--round-timeout 600] [--local-epochs 5] [--samples-per-second 100]
        [--scenarios slow,noslow] [--strategies fedavg,fedbuff] [--seeds 0,1,2] [--keep DIR]
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_vs_centralized import centralized

from fedge.config import RunConfig
from fedge.simulations.runner import plan_simulation, simulate

POINTS = 0.02
# scenario → (description, slow_fraction); 20 % offline in both.
SCENARIOS = {"slow": ("30 % slow (×10), 20 % offline", 0.3),
             "noslow": ("no slow clients, 20 % offline", 0.0)}
STRATEGIES = ("fedavg", "fedbuff")


def base_config(args: argparse.Namespace, slow_fraction: float) -> RunConfig:
    return RunConfig(dataset="digits", clients=100, fraction=args.concurrency / 100,
                     min_clients=args.concurrency, local_epochs=args.local_epochs,
                     slow_fraction=slow_fraction, slowdown=10.0, offline_fraction=0.2,
                     round_timeout=args.round_timeout,
                     samples_per_second=args.samples_per_second, device="cpu", workers=1,
                     seed=args.seed)


def run_config(base: RunConfig, strategy: str, args: argparse.Namespace) -> RunConfig:
    if strategy == "fedavg":
        steps = args.updates // args.concurrency
        return base.updated(**{"strategy": "fedavg", "rounds": steps,
                                       "patience": steps + 1})
    steps = args.updates // args.buffer
    return base.updated(**{"strategy": "fedbuff", "rounds": steps,
                                   "patience": steps + 1, "concurrency": args.concurrency,
                                   "buffer": args.buffer, "server_lr": args.server_lr,
                                   "eval_every": 1})


def measure(config: RunConfig, target: float, folder: Path) -> dict:
    started = time.perf_counter()
    outcome = simulate(plan_simulation(config), folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    rounds = metrics["rounds"]
    if config.strategy.name == "fedbuff":  # results aggregated in each version
        used = {v["version"]: v["updates"] for v in metrics["versions"]}
    else:
        used = {r["round"]: r["num_clients"] for r in rounds}
    updates = 0
    reached = None
    for record in rounds:
        updates = sum(n for step, n in used.items() if step <= record["round"])
        if record["val_accuracy"] >= target:
            reached = {"step": record["round"], "seconds": record["elapsed_seconds"],
                       "updates": updates}
            break
    return {"reached": reached, "steps": len(rounds),
            "updates": sum(used.values()),
            "seconds": rounds[-1]["elapsed_seconds"],
            "timeouts": sum(r["timeouts"] for r in rounds),
            "best_val": max(r["val_accuracy"] for r in rounds),
            "test": outcome.test_accuracy, "best_step": outcome.best_round,
            "wall": time.perf_counter() - started}


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def time_ratio(rows: dict) -> float | None:
    """FedBuff's simulated time to target over FedAvg's; None unless both got there."""
    buff, avg = rows["fedbuff"]["reached"], rows["fedavg"]["reached"]
    return buff["seconds"] / avg["seconds"] if buff and avg else None


def print_seed(args: argparse.Namespace, seed: int, central: dict, target: float,
               results: dict[str, dict[str, dict]]) -> None:
    print(f"\ndigits, 100 clients (Dirichlet 0.5), C = {args.concurrency} training at once "
          f"(FedAvg: {args.concurrency} sampled a round), FedBuff K = {args.buffer}, "
          f"η_g = {args.server_lr:g}, s(τ) = 1/√(1+τ), no staleness limit; "
          f"{args.local_epochs} local epochs (local early stopping on), deadline "
          f"{args.round_timeout:g} s, {args.samples_per_second:g} samples/s, quarantine "
          f"{RunConfig().quarantine:g} s, seed {seed}; {args.updates} client updates "
          "per run, no global early stopping")
    print(f"centralized: val accuracy {central['val']:.4f}, test {central['test']:.4f}; "
          f"target val accuracy ≥ {target:.4f}")
    print("| scenario | strategy | simulated s to target | server steps to target "
          "| updates to target | FedBuff/FedAvg time | best val acc | test acc (best model) "
          "| steps / simulated s of the whole run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, rows in results.items():
        for strategy, r in rows.items():
            hit = r["reached"]
            ratio = ""
            if strategy == "fedbuff" and set(rows) == set(STRATEGIES):
                ratio = (f"{time_ratio(rows):.2f}×" if time_ratio(rows) is not None
                         else "FedAvg not on target" if hit else "")
            cells = ([f"{hit['seconds']:.1f}", str(hit["step"]), str(hit["updates"])] if hit
                     else [f"not within {r['seconds']:.1f}", f"not within {r['steps']}",
                           f"not within {r['updates']}"])
            print(f"| {SCENARIOS[scenario][0]} | {strategy} | {' | '.join(cells)} | {ratio} "
                  f"| {r['best_val']:.4f} | {r['test']:.4f} | {r['steps']} / "
                  f"{r['seconds']:.1f} |")


def print_summary(by_seed: dict[int, dict[str, dict[str, dict]]]) -> None:
    """Means over the seeds, and the goals judged on them: one seed's 270 test samples
    make a point of accuracy three samples."""
    seeds = sorted(by_seed)
    print(f"\nmeans over seeds {', '.join(map(str, seeds))}")
    print("| scenario | FedAvg s to target | FedBuff s to target | FedBuff/FedAvg time "
          "(mean of ratios) | FedAvg test acc | FedBuff test acc | difference (points) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for scenario in by_seed[seeds[0]]:
        runs = [by_seed[seed][scenario] for seed in seeds]
        if any(set(rows) != set(STRATEGIES) for rows in runs):
            continue
        ratios = [time_ratio(rows) for rows in runs]
        seconds = {strategy: [rows[strategy]["reached"]["seconds"] for rows in runs
                              if rows[strategy]["reached"]] for strategy in STRATEGIES}
        tests = {strategy: np.mean([rows[strategy]["test"] for rows in runs])
                 for strategy in STRATEGIES}
        gap = (tests["fedbuff"] - tests["fedavg"]) * 100
        ratio = float(np.mean(ratios)) if None not in ratios else None

        shown = {strategy: (f"{np.mean(found):.1f}" if len(found) == len(seeds)
                            else f"on target in {len(found)} of {len(seeds)} seeds")
                 for strategy, found in seconds.items()}
        print(f"| {SCENARIOS[scenario][0]} | {shown['fedavg']} | {shown['fedbuff']} | "
              f"{'n/a' if ratio is None else f'{ratio:.2f}×'} "
              f"({', '.join('n/a' if r is None else f'{r:.2f}' for r in ratios)}) | "
              f"{tests['fedavg']:.4f} | {tests['fedbuff']:.4f} | {gap:+.1f} |")
        bound = 1 / 3 if scenario == "slow" else 1.0
        verdicts.append(
            f"{SCENARIOS[scenario][0]}: FedBuff "
            + ("not on target in every seed" if ratio is None
               else f"{ratio:.2f}× FedAvg's simulated time")
            + f" (goal ≤ {'1/3' if scenario == 'slow' else '1×'}): "
            f"{verdict(ratio is not None and ratio <= bound)}; final test accuracy "
            f"{gap:+.1f} points vs FedAvg (goal ≥ −1): {verdict(gap >= -1)}")
    print()
    print("\n".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--buffer", type=int, default=5)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--updates", type=int, default=4000,
                        help="client updates per run (FedAvg updates/C rounds, FedBuff "
                             "updates/K versions)")
    parser.add_argument("--round-timeout", type=float, default=600.0,
                        help="deadline in simulated seconds, the same for both")
    parser.add_argument("--local-epochs", type=int, default=RunConfig().local_epochs)
    parser.add_argument("--samples-per-second", type=float,
                        default=RunConfig().samples_per_second)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2",
                        help="each seed is its own split, fleet and run; goals on the means")
    parser.add_argument("--keep", type=Path, help="keep the run folders in this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("flwr", "fedge"):  # thousands of per-round lines; the table is the result
        logging.getLogger(name).setLevel(logging.ERROR)

    by_seed: dict[int, dict[str, dict[str, dict]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        for seed in map(int, args.seeds.split(",")):
            args.seed = seed
            # The reference does not depend on the devices: the same samples, fedge's
            # defaults.
            central = centralized(base_config(args, 0.0).model_copy(
                update={"lr": RunConfig().lr, "batch_size": RunConfig().batch_size}))
            target = central["val"] - POINTS
            results: dict[str, dict[str, dict]] = {}
            for scenario in args.scenarios.split(","):
                base = base_config(args, SCENARIOS[scenario][1])
                for strategy in args.strategies.split(","):
                    config = run_config(base, strategy, args)
                    row = measure(config, target,
                                  Path(folder) / f"seed{seed}-{scenario}-{strategy}")
                    results.setdefault(scenario, {})[strategy] = row
                    print(f"seed {seed} {scenario} {strategy}: {json.dumps(row)}",
                          file=sys.stderr, flush=True)
            by_seed[seed] = results
            print_seed(args, seed, central, target, results)
    print_summary(by_seed)


if __name__ == "__main__":
    main()
