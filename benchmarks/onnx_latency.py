"""Edge inference: onnxruntime vs torch eager, fp32 vs int8, for every fedge model.

Each model is trained briefly on its data set (centrally: this measures inference, not
federation), exported to ONNX, quantized to int8 (static, calibrated on held-out samples;
and dynamic, weights only, for size and accuracy), and timed on one thread at batch 1 and
64, all in one invocation (compare ratios; the machine is noisy). Goals: onnxruntime
≤ 0.5× torch's latency at batch 1; int8 ≤ 0.3× the fp32 size at ≤ 1 point accuracy loss.

    python benchmarks/onnx_latency.py [--runs 300]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedge.client.data import split_train_val
from fedge.client.training import LocalTraining, train_locally
from fedge.config import TrainingSettings
from fedge.models.export import export_onnx
from fedge.models.inference import predict
from fedge.models.quantize import latency_us, quantize_int8
from fedge.models.registry import MODELS, as_input_tensor, build_model, spec_from_data
from fedge.simulations.datasets import load_dataset, split_federated

DATA_FOR_MODEL = {"cnn": "digits", "mlp": "breast_cancer", "sensor1d": "synthetic-sensor",
                  "tinytext": "synthetic-text"}


def torch_latency_us(model: torch.nn.Module, inputs: torch.Tensor, runs: int) -> float:
    times = []
    with torch.inference_mode():
        model(inputs)
        for _ in range(runs):
            started = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted == labels))


def measure(name: str, runs: int, folder: Path) -> dict:
    data = load_dataset(DATA_FOR_MODEL[name])
    split = split_federated(data, seed=0)
    val_x, _ = split.server_val
    test_x, test_y = split.test
    spec = spec_from_data(name, val_x, data.num_classes, 0.2, data.vocab_size)
    torch.manual_seed(0)
    model = build_model(spec)
    train_locally(model, spec, split_train_val(*split.clients, 0.2, 0),
                  LocalTraining(TrainingSettings(local_epochs=10, local_patience=3)),
                  torch.device("cpu"))
    model.eval()
    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    dynamic = folder / f"{name}.int8-dynamic.onnx"
    export_onnx(model, spec, val_x[:64], fp32)
    quantize_int8(fp32, int8, val_x[:64])
    quantize_int8(fp32, dynamic, val_x[:64], method="dynamic")
    row = {"model": name, "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
           "dynamic_bytes": dynamic.stat().st_size,
           "fp32_acc": accuracy(predict(fp32, test_x), test_y),
           "int8_acc": accuracy(predict(int8, test_x), test_y),
           "dynamic_acc": accuracy(predict(dynamic, test_x), test_y)}
    for batch in (1, 64):
        inputs = as_input_tensor(spec, np.repeat(test_x[:1], batch, 0))
        row[f"torch_{batch}"] = torch_latency_us(model, inputs, runs)
        row[f"ort_{batch}"] = latency_us(fp32, test_x[0], batch, runs)
        row[f"int8_{batch}"] = latency_us(int8, test_x[0], batch, runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(name, args.runs, Path(folder)) for name in sorted(MODELS)]
    print(f"\nmedian µs per call, 1 thread, {args.runs} calls each")
    print("| model | batch | torch eager | onnxruntime fp32 | ort/torch | onnxruntime int8 "
          "| int8/torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for batch in (1, 64):
            t, o, q = r[f"torch_{batch}"], r[f"ort_{batch}"], r[f"int8_{batch}"]
            print(f"| {r['model']} | {batch} | {t:.1f} | {o:.1f} | {o / t:.2f}× | {q:.1f} "
                  f"| {q / t:.2f}× |")
    print("\n| model | fp32 bytes | fp32 test acc | int8 static: size | test acc (change) "
          "| int8 dynamic: size | test acc (change) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[f'{q}_bytes'] / r['fp32_bytes']:.2f}× | {r[f'{q}_acc']:.4f} "
                 f"({100 * (r[f'{q}_acc'] - r['fp32_acc']):+.1f})" for q in ("int8", "dynamic")]
        print(f"| {r['model']} | {r['fp32_bytes']} | {r['fp32_acc']:.4f} | {cells[0]} | "
              f"{cells[1]} |")


if __name__ == "__main__":
    main()
