"""The model registry: raw inputs in, logits out, and verified ONNX exports."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.errors import FedgeError
from fedge.models.export import export_onnx
from fedge.models.registry import MODELS, ModelSpec, as_input_tensor, build_model, spec_from_data
from fedge.simulations.datasets import load_dataset

DATA_FOR_MODEL = {"cnn": "digits", "mlp": "breast_cancer", "sensor1d": "synthetic-sensor",
                  "tinytext": "synthetic-text"}


def _spec_and_inputs(name: str) -> tuple[ModelSpec, np.ndarray]:
    data = load_dataset(DATA_FOR_MODEL[name])
    return spec_from_data(name, data.x, data.num_classes, 0.2, data.vocab_size), data.x[:50]


def test_the_registry_has_the_four_edge_models():
    assert set(MODELS) == {"cnn", "mlp", "sensor1d", "tinytext"}


@pytest.mark.parametrize("name", sorted(DATA_FOR_MODEL))
def test_each_model_maps_raw_samples_to_class_logits(name):
    spec, x = _spec_and_inputs(name)
    model = build_model(spec).eval()
    logits = model(as_input_tensor(spec, x))
    assert logits.shape == (len(x), spec.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["cnn", "mlp", "sensor1d"])
def test_input_scaling_is_inside_the_model_and_not_in_the_exchanged_weights(name):
    data = load_dataset(DATA_FOR_MODEL[name])
    spec = spec_from_data(name, data.x, data.num_classes, 0.2)
    model = build_model(spec)
    assert not any("mean" in key or "std" in key for key in model.state_dict())
    scaled = model.scaling(as_input_tensor(spec, data.x))
    axes = tuple(a for a in range(scaled.ndim) if a != 1)
    # fitted on these very samples, so each channel or feature comes out standardised
    torch.testing.assert_close(scaled.mean(dim=axes), torch.zeros(spec.input_shape[0]),
                               atol=1e-4, rtol=0)
    assert scaled.std(dim=axes).max() < 1.01


@pytest.mark.parametrize("name", sorted(DATA_FOR_MODEL))
def test_onnx_export_matches_torch_for_any_batch_size(name, tmp_path):
    spec, x = _spec_and_inputs(name)
    model = build_model(spec)
    report = export_onnx(model, spec, x, tmp_path / f"{name}.onnx")

    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"))
    with torch.no_grad():
        expected = model.eval()(as_input_tensor(spec, x)).numpy()
    for batch in (1, 7, 50):
        actual = session.run(None, {"input": x[:batch]})[0]
        np.testing.assert_allclose(actual, expected[:batch], atol=1e-4)


def test_an_exported_model_carries_no_source_paths_or_stack_traces(tmp_path):
    spec, x = _spec_and_inputs("cnn")
    export_onnx(build_model(spec), spec, x, tmp_path / "cnn.onnx")

    exported = (tmp_path / "cnn.onnx").read_bytes()
    assert b"networks.py" not in exported and b"stack_trace" not in exported


def test_a_failed_parity_check_leaves_no_onnx_file(tmp_path):
    spec, x = _spec_and_inputs("mlp")
    with pytest.raises(FedgeError, match="differs from torch"):
        export_onnx(build_model(spec), spec, x, tmp_path / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_names_list_the_known_ones():
    from fedge.models.source import resolve_factory

    with pytest.raises(FedgeError, match=r"unknown model 'resnet'.*cnn, mlp, sensor1d, "
                                         r"tinytext, or your own as FILE.py:NAME"):
        resolve_factory("resnet")


def test_samples_of_the_wrong_rank_are_rejected_by_name():
    with pytest.raises(FedgeError, match=r"'cnn' expects samples shaped \(channels, height"):
        spec_from_data("cnn", np.zeros((4, 30), np.float32), 2, 0.1)


def test_a_model_spec_round_trips_through_json_and_rejects_garbage():
    spec, _ = _spec_and_inputs("cnn")
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(FedgeError, match="invalid model spec"):
        ModelSpec.from_json('{"name": "cnn"}')
