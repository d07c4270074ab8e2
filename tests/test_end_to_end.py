"""The main job: `fedge simulate` with no options, on real handwritten digits."""

import json
import struct

import numpy as np
import onnxruntime as ort
import torch

from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.datasets import load_dataset, split_federated

from conftest import run_fedge, run_python

RUN_FILES = {"metrics.json", "checkpoint.pt", "best.pt", "curves.png", "model.onnx",
             "onnx_report.json"}


def _test_split():
    return split_federated(load_dataset("digits", 0), seed=0).test


def test_default_run_writes_every_artifact_and_nothing_else(default_run):
    assert {p.name for p in default_run.iterdir()} == RUN_FILES


def test_default_run_reaches_90_percent_on_held_out_digits(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["config"]["clients"] == 10
    assert metrics["config"]["partition"] == "dirichlet:0.5"
    assert len(metrics["rounds"]) <= 20
    assert metrics["test"]["accuracy"] >= 0.90
    assert metrics["test"]["samples"] == len(_test_split()[1])


def test_every_round_is_recorded_with_server_validation(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    for r in rounds:
        assert r["num_clients"] == 10
        assert r["seconds"] > 0
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["train_loss"] > 0 and r["val_loss"] > 0
    val_losses = [r["val_loss"] for r in rounds]
    assert metrics["best_round"] == 1 + int(np.argmin(val_losses))
    assert rounds[-1]["val_loss"] < metrics["initial"]["val_loss"]


def test_checkpoints_hold_the_last_and_the_best_round(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    last, best = (load_checkpoint(default_run / name) for name in ("checkpoint.pt", "best.pt"))
    assert last.round == len(metrics["rounds"])
    assert best.round == metrics["best_round"] == last.best_round
    assert last.history == metrics["rounds"]
    assert last.config == metrics["config"]
    assert last.strategy_state["class"] == "FedAvg"


def test_onnx_model_is_the_best_round_and_matches_torch_on_raw_digits(default_run):
    report = json.loads((default_run / "onnx_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4
    assert report["opset"] >= 17
    assert report["size_bytes"] == (default_run / "model.onnx").stat().st_size
    assert report["best_round"] == json.loads((default_run / "metrics.json").read_text())[
        "best_round"]

    test_x, _ = _test_split()
    best = load_checkpoint(default_run / "best.pt")
    with torch.no_grad():
        expected = best.model().eval()(torch.as_tensor(test_x)).numpy()
    session = ort.InferenceSession(str(default_run / "model.onnx"))
    for batch in (test_x[:1], test_x[:7], test_x):  # dynamic batch axis
        actual = session.run(None, {"input": batch})[0]
        np.testing.assert_allclose(actual, expected[: len(batch)], atol=1e-4)


def test_curves_are_a_png_image(default_run):
    data = (default_run / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 200


def test_predict_agrees_with_torch_without_importing_torch(default_run, tmp_path):
    test_x, _ = _test_split()
    with torch.no_grad():
        expected = load_checkpoint(default_run / "best.pt").model().eval()(
            torch.as_tensor(test_x)).argmax(1).numpy()
    np.save(tmp_path / "digits.npy", test_x)
    np.savetxt(tmp_path / "digits.csv", test_x.reshape(len(test_x), -1), delimiter=",")
    # A device may only have onnxruntime: make any import of torch fail.
    block_torch = "import sys; sys.modules['torch'] = None; from fedge.cli import app; app()"
    for inputs in ("digits.npy", "digits.csv"):
        result = run_python(block_torch, "predict", str(default_run / "model.onnx"),
                                   str(tmp_path / inputs))
        assert result.returncode == 0, result.stderr
        predicted = np.array([int(line) for line in result.stdout.split()])
        np.testing.assert_array_equal(predicted, expected)


def test_export_rebuilds_the_same_onnx_model_from_a_checkpoint(default_run, tmp_path):
    out = tmp_path / "exported.onnx"
    result = run_fedge("export", str(default_run / "best.pt"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "max |onnxruntime − torch|" in result.stdout
    test_x, _ = _test_split()
    original = ort.InferenceSession(str(default_run / "model.onnx")).run(None, {"input": test_x})
    exported = ort.InferenceSession(str(out)).run(None, {"input": test_x})
    np.testing.assert_allclose(exported[0], original[0], atol=1e-5)

