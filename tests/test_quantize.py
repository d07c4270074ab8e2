"""int8 export for the edge: smaller, as accurate, checked against the fp32 model."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedge.cli import app
from fedge.errors import FedgeError
from fedge.models.export import export_onnx
from fedge.models.inference import predict
from fedge.models.quantize import export_int8, quantize_int8
from fedge.models.registry import MODELS, build_model, spec_from_data
from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.datasets import load_dataset, split_federated

from conftest import run_fedge

DATA_FOR_MODEL = {"cnn": "digits", "mlp": "breast_cancer", "sensor1d": "synthetic-sensor",
                  "tinytext": "synthetic-text"}


@pytest.fixture(scope="module")
def digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    return split_federated(load_dataset("digits"), seed=0).test


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_model_of_a_trained_run_is_under_a_third_the_size_and_as_accurate(
        method, default_run, digits_test_split, tmp_path):
    saved = load_checkpoint(default_run / "best.pt")
    x, y = digits_test_split
    out = tmp_path / "model.int8.onnx"

    report = export_int8(saved.model(), saved.model_spec, saved.reference_inputs.numpy(),
                         out, method, x, y)

    assert report["size_ratio"] < (0.3 if method == "static" else 0.4)
    assert out.stat().st_size == report["int8"]["size_bytes"]
    assert report["int8"]["accuracy"] >= report["fp32"]["accuracy"] - 0.02
    assert report["agreement"] >= 0.95 and report["evaluated_samples"] == len(y)
    # The int8 file is an ordinary ONNX model for onnxruntime on a device.
    assert np.mean(predict(out, x) == y) == pytest.approx(report["int8"]["accuracy"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_edge_model_quantizes_to_int8(name, tmp_path):
    data = load_dataset(DATA_FOR_MODEL[name])
    spec = spec_from_data(name, data.x, data.num_classes, 0.2, data.vocab_size)
    torch.manual_seed(0)

    report = export_int8(build_model(spec), spec, data.x[:64], tmp_path / "m.onnx")

    assert report["int8"]["size_bytes"] < report["fp32"]["size_bytes"]
    assert report["agreement"] >= 0.8


def test_a_failed_quantization_writes_nothing(tmp_path):
    data = load_dataset("digits")
    spec = spec_from_data("cnn", data.x, 10, 0.2)
    export_onnx(build_model(spec), spec, data.x[:64], tmp_path / "fp32.onnx")
    flat_rows = data.x[:64].reshape(64, -1)  # not the model's input shape
    with pytest.raises(FedgeError, match="nothing was written"):
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", flat_rows)
    assert [p.name for p in tmp_path.iterdir()] == ["fp32.onnx"]


def test_export_int8_from_the_command_line_reports_size_accuracy_and_latency(
        default_run, digits_test_split, tmp_path):
    np.savez(tmp_path / "test.npz", x=digits_test_split[0], y=digits_test_split[1])
    out = tmp_path / "model.int8.onnx"

    result = run_fedge("export", str(default_run / "best.pt"), "-o", str(out),
                       "--quantize", "int8", "--eval-data", str(tmp_path / "test.npz"))

    assert result.returncode == 0, result.stderr
    assert out.is_file() and "int8 vs fp32 on 270 held-out samples" in result.stdout
    assert "latency" in result.stdout and "size" in result.stdout
    # The same command in this process: evaluation data that is not there.
    missing = CliRunner().invoke(app, ["export", str(default_run / "best.pt"), "-o",
                                       str(tmp_path / "b.onnx"), "--quantize", "int8",
                                       "--eval-data", str(tmp_path / "none.npz")])
    assert missing.exit_code == 2 and "error:" in missing.stderr
    assert not (tmp_path / "b.onnx").exists()
