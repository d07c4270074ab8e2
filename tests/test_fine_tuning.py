"""Fine-tuning a pretrained model beats training it from scratch, and freezing part of it
sends less: benchmarks/fine_tuning.py, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.server.checkpoint import load_checkpoint

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
