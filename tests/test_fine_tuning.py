"""Fine-tuning a pretrained model beats training it from scratch, and freezing part of it
sends less: benchmarks/fine_tuning.py, run as a user runs it. Frozen BatchNorm layers
train on their pretrained statistics."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.client.data import split_train_val
from fedge.client.training import LocalTraining, train_locally
from fedge.config import RunConfig, TrainingSettings
from fedge.models.registry import build_model
from fedge.models.source import instantiate, resolve_factory
from fedge.server.checkpoint import load_checkpoint
from fedge.server.starting_model import starting_model
from fedge.simulations.datasets import load_dataset

from conftest import write_user_model

pytestmark = pytest.mark.timeout(600)

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "fine_tuning.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fine-tuning")
    result = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--clients", "4",
                             "--out", str(root)], capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def _metrics(root: Path, run: str) -> dict:
    return json.loads((root / run / "metrics.json").read_text())


def test_fine_tuning_beats_training_from_scratch_in_the_same_rounds(runs):
    scratch, tuned = _metrics(runs, "scratch"), _metrics(runs, "fine-tuned")
    assert tuned["test"]["accuracy"] > scratch["test"]["accuracy"] + 0.1
    assert tuned["model"]["init"] == str(runs / "pretrained.pt")
    # Round 0, the starting model, is in metrics.json: what the federation added shows.
    for run in (scratch, tuned):
        assert run["initial"]["round"] == 0
        assert run["rounds"][-1]["val_loss"] < run["initial"]["val_loss"]


def test_freezing_the_features_sends_fewer_bytes_and_still_beats_scratch(runs):
    frozen, tuned = _metrics(runs, "frozen"), _metrics(runs, "fine-tuned")
    assert max(r["bytes_per_client"] for r in frozen["rounds"]) < 0.6 * min(
        r["bytes_per_client"] for r in tuned["rounds"])
    assert frozen["test"]["accuracy"] > _metrics(runs, "scratch")["test"]["accuracy"] + 0.1
    assert {"features.0.weight", "features.4.running_mean"} <= set(frozen["model"]["frozen"])


def test_frozen_entries_keep_their_pretrained_values_and_the_head_is_new(runs):
    pretrained = torch.load(runs / "pretrained.pt")
    final = load_checkpoint(runs / "frozen" / "checkpoint.pt").state_dict
    for name in _metrics(runs, "frozen")["model"]["frozen"]:
        np.testing.assert_array_equal(final[name].numpy(), pretrained[name].numpy())
    assert pretrained["head.2.weight"].shape == (5, 512)  # pretrained on digits 0-4
    assert final["head.2.weight"].shape == (10, 512)


def _pretrained(tmp_path: Path) -> tuple[str, Path, torch.nn.Module]:
    """The user's BatchNorm model with statistics of real digits (as pretraining leaves
    them, far from the fresh 0 and 1), saved as --init weights."""
    model_name = f"{write_user_model(tmp_path / 'src')}:Net"
    torch.manual_seed(0)
    model = instantiate(*resolve_factory(model_name), (1, 8, 8), 10, 0.0)
    model.train()
    with torch.no_grad():
        model(torch.as_tensor(load_dataset("digits").x[:500]))
    torch.save(model.state_dict(), tmp_path / "pretrained.pt")
    return model_name, tmp_path / "pretrained.pt", model.eval()


def test_frozen_batchnorm_layers_train_on_their_pretrained_statistics(tmp_path):
    model_name, weights, pretrained = _pretrained(tmp_path)
    digits = load_dataset("digits")
    val_x, val_y = digits.x[500:600], digits.y[500:600]
    config = RunConfig(model=model_name, init=str(weights), freeze=["features.1.*"],
                       dropout=0.0)
    start = starting_model(config, val_x, val_y, 10)

    # What a client builds from the server's program: its train graph normalizes with
    # the layer's statistics, as the pretrained model does in eval mode.
    client_model = build_model(start.spec)
    client_model.load_state_dict(start.state)
    x = torch.as_tensor(digits.x[600:664])
    with torch.no_grad():
        torch.testing.assert_close(client_model.train()(x), pretrained(x))

    data = split_train_val(digits.x[:200], digits.y[:200], val_fraction=0.2)
    settings = LocalTraining(TrainingSettings(local_epochs=2, lr=0.01))
    train_locally(client_model, start.spec, data, settings, torch.device("cpu"))
    trained = client_model.state_dict()
    for name in ("features.1.running_mean", "features.1.running_var"):
        assert torch.equal(trained[name], pretrained.state_dict()[name]), name
    assert not torch.equal(trained["features.0.weight"], start.state["features.0.weight"])

    # The fingerprint is the architecture's: the same with and without --freeze, so a run
    # started before frozen layers trained this way resumes.
    plain = starting_model(RunConfig(model=model_name, init=str(weights), dropout=0.0),
                           val_x, val_y, 10)
    assert start.spec.fingerprint == plain.spec.fingerprint
    assert start.spec.program != plain.spec.program
