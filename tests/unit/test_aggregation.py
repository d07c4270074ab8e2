"""The server's arithmetic on updates: FedBuff's buffered step, the update screen's norm
check, and the measures it evaluates the global model by."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import ModelSpec
from fedge.server.fedbuff import buffered_step, staleness_weight
from fedge.server.screening import norm_outliers


def test_the_staleness_weight_is_fedbuffs_inverse_square_root():
    assert [staleness_weight(tau) for tau in (0, 1, 3, 8)] == [1.0, 1 / math.sqrt(2), 0.5,
                                                                 1 / 3]


def test_a_step_averages_staleness_weighted_updates_over_the_buffer():
    current = {"w": np.array([1.0, 1.0], np.float32), "count": np.array(7)}
    updates = [({"w": np.array([2.0, 0.0])}, 0), ({"w": np.array([0.0, 4.0])}, 3)]
    stepped = buffered_step(current, updates, server_lr=0.5)
    # w + 0.5 · (1/2) · (1 · [2, 0] + (1/2) · [0, 4])
    np.testing.assert_allclose(stepped["w"], [1.5, 1.5])
    assert stepped["w"].dtype == np.float32 and stepped["count"] == 7


def test_an_update_beyond_the_ratio_times_the_median_norm_is_an_outlier():
    outliers = norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 12.0}, max_norm_ratio=10.0)
    assert list(outliers) == [3]
    assert outliers[3] == ("update norm 12 is 10.9× the round's median 1.1 (limit 10×)")


def test_earlier_accepted_norms_join_the_median_so_a_buffer_of_attackers_is_caught():
    # Two attackers fill a buffer of 2: their own median would pass them.
    assert norm_outliers({0: 50.0, 1: 60.0}, max_norm_ratio=10.0) == {}
    caught = norm_outliers({0: 50.0, 1: 60.0}, max_norm_ratio=10.0,
                           reference=[1.0, 1.1, 0.9, 1.2], over="recent")
    assert sorted(caught) == [0, 1] and "recent median" in caught[0]


@pytest.mark.parametrize("norms, ratio", [({0: 1.0, 1: 500.0}, 0.0), ({0: 0.0, 1: 0.0}, 10.0),
                                          ({}, 10.0)])
def test_the_norm_check_is_off_at_ratio_zero_and_without_a_scale(norms, ratio):
    assert norm_outliers(norms, max_norm_ratio=ratio) == {}


def test_the_loss_and_accuracy_are_means_over_samples_whatever_the_batch_size():
    spec = ModelSpec(name="linear", input_shape=(2,), num_classes=2, dropout=0.0,
                     input_dtype="float32", fingerprint="test")
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits are the inputs
    x = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], np.float32)
    y = np.array([0, 1, 1])
    expected_loss = np.mean([math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)),
                             math.log(1 + math.exp(3))])
    for batch_size in (1, 2, 512):
        loss, accuracy = evaluate_classifier(model, spec, x, y, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-6)
        assert accuracy == pytest.approx(2 / 3)
