"""The measures of each task equal scikit-learn's on the same predictions; a measure the
data cannot define is null, never a perfect score; thresholds meet their rule; the
monitored measure picks the best round in its own direction."""

import logging
from typing import get_args

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from fedge.client.training import local_monitor
from fedge.config import TaskName, TaskSettings
from fedge.errors import FedgeError
from fedge.models import tasks
from fedge.models.measures import (
    HEADLINE,
    SCALARS,
    choose_threshold,
    higher_is_better,
    measures,
    warn_lacking,
)
from fedge.models.registry import ModelSpec
from fedge.server.rounds import RoundRecord, RoundTracker
from fedge.server.run_folder import client_report

RNG = np.random.default_rng(0)


def test_classification_measures_match_scikit_learn():
    y = RNG.integers(0, 4, 300)
    scores = RNG.dirichlet(np.ones(4), 300) + np.eye(4)[y] * RNG.random((300, 1))
    predicted = scores.argmax(axis=1)
    found = measures("classification", scores, y, names=["a", "b", "c", "d"])
    assert found["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted))
    assert found["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, predicted))
    assert found["macro_f1"] == pytest.approx(sk.f1_score(y, predicted, average="macro"))
    assert found["confusion_matrix"] == sk.confusion_matrix(y, predicted).tolist()
    recalls = sk.recall_score(y, predicted, average=None)
    assert [found["per_class"][n]["recall"] for n in "abcd"] == pytest.approx(recalls)


def test_binary_measures_match_scikit_learn_at_the_threshold():
    y = (RNG.random(400) < 0.05).astype(np.int64)
    probability = np.clip(0.3 * y + RNG.random(400) * 0.7, 0, 1)
    found = measures("binary", probability, y, threshold=(0.6,), names=["ok", "fraud"])
    predicted = (probability >= 0.6).astype(int)
    assert found["roc_auc"] == pytest.approx(sk.roc_auc_score(y, probability))
    assert found["pr_auc"] == pytest.approx(sk.average_precision_score(y, probability))
    assert found["precision"] == pytest.approx(sk.precision_score(y, predicted))
    assert found["recall"] == pytest.approx(sk.recall_score(y, predicted))
    assert found["f1"] == pytest.approx(sk.f1_score(y, predicted))
    assert found["threshold"] == 0.6


def test_a_model_that_flags_nothing_scores_no_recall_whatever_its_accuracy():
    y = np.array([0] * 98 + [1] * 2)
    found = measures("binary", np.full(100, 0.01), y)
    assert found["accuracy"] == 0.98
    assert found["recall"] == 0.0 and found["f1"] == 0.0
    assert found["precision"] is None  # nothing flagged: undefined, not perfect


def test_a_set_without_positives_gives_null_ranking_measures_and_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            found = measures("binary", RNG.random(20), np.zeros(20, dtype=int),
                             names=["ok", "fraud"], where="the test set (a unit test)")
    assert found["roc_auc"] is None and found["pr_auc"] is None and found["recall"] is None
    lines = [r.getMessage() for r in caplog.records if "a unit test" in r.getMessage()]
    assert len(lines) == 1 and "'fraud'" in lines[0]


def test_multilabel_measures_match_scikit_learn():
    y = (RNG.random((200, 3)) < [0.5, 0.2, 0.05]).astype(np.int64)
    probability = np.clip(0.4 * y + RNG.random((200, 3)) * 0.6, 0, 1)
    found = measures("multilabel", probability, y, names=["scratch", "dent", "rust"])
    predicted = (probability >= 0.5).astype(int)
    assert found["micro_f1"] == pytest.approx(sk.f1_score(y, predicted, average="micro"))
    assert found["macro_f1"] == pytest.approx(sk.f1_score(y, predicted, average="macro"))
    assert found["subset_accuracy"] == pytest.approx(sk.accuracy_score(y, predicted))
    assert found["per_label"]["rust"]["average_precision"] == pytest.approx(
        sk.average_precision_score(y[:, 2], probability[:, 2]))


def test_regression_measures_match_scikit_learn():
    y = RNG.normal(150, 50, (120, 2))
    predicted = y + RNG.normal(0, 20, (120, 2))
    found = measures("regression", predicted, y, names=["rul", "wear"])
    assert found["mae"] == pytest.approx(sk.mean_absolute_error(y, predicted))
    assert found["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y, predicted)))
    assert found["r2"] == pytest.approx(sk.r2_score(y, predicted))
    assert found["per_target"]["wear"]["r2"] == pytest.approx(sk.r2_score(y[:, 1],
                                                                         predicted[:, 1]))


@pytest.mark.parametrize("rule, check", [
    ("recall:0.8", lambda p, r: r >= 0.8),
    ("precision:0.9", lambda p, r: p >= 0.9),
])
def test_a_threshold_rule_is_met_on_the_data_it_is_chosen_on(rule, check):
    y = (RNG.random(500) < 0.1).astype(np.int64)
    probability = np.clip(0.5 * y + RNG.random(500) * 0.6, 0, 1)
    (cut,) = choose_threshold(rule, probability, y)
    predicted = probability >= cut
    assert check(sk.precision_score(y, predicted), sk.recall_score(y, predicted))


def test_the_f1_threshold_is_the_best_f1_and_a_number_is_taken_as_given():
    y = (RNG.random(300) < 0.2).astype(np.int64)
    probability = np.clip(0.4 * y + RNG.random(300) * 0.6, 0, 1)
    (cut,) = choose_threshold("f1", probability, y)
    best = max(sk.f1_score(y, probability >= t) for t in np.unique(probability))
    assert sk.f1_score(y, probability >= cut) == pytest.approx(best)
    assert choose_threshold("0.3", probability, y) == (0.3,)
    assert choose_threshold(None, probability, y) == (0.5,)


def test_direction_is_known_per_measure():
    assert not higher_is_better("val_loss") and not higher_is_better("val_mae")
    assert higher_is_better("val_pr_auc") and higher_is_better("val_r2")


def _record(round_: int, val_loss: float, pr_auc: float) -> dict:
    return RoundRecord(round=round_, train_loss=0.1, val_loss=val_loss, val_accuracy=0.9,
                       num_clients=3, client_val_loss=None, client_val_accuracy=None,
                       client_epochs=None, clients_stopped_early=None, failures=0, timeouts=0,
                       slowest_client_seconds=None, seconds=1.0,
                       val_measures={"pr_auc": pr_auc}).as_dict()


@pytest.mark.parametrize("monitor, best", [("val_loss", 2), ("val_pr_auc", 3)])
def test_the_monitored_measure_picks_the_best_round(monitor, best):
    history = [_record(1, 0.50, 0.30), _record(2, 0.40, 0.35), _record(3, 0.45, 0.60)]
    tracker = RoundTracker(None, None, None, patience=3, min_delta=0.0, on_round=None,
                           round_stats=None, monitor=monitor)
    tracker.resume(history, None)
    assert tracker.best_round == best


def test_a_round_whose_monitored_measure_is_undefined_is_never_the_best():
    history = [_record(1, 0.5, 0.3), RoundRecord(**{**_record(2, 0.1, 0.0),
                                                    "val_measures": {"pr_auc": None}})]
    tracker = RoundTracker(None, None, None, patience=3, min_delta=0.0, on_round=None,
                           round_stats=None, monitor="val_pr_auc")
    tracker.resume([history[0], history[1].as_dict()], None)
    assert tracker.best_round == 1


def test_balanced_class_weights_come_from_the_servers_labels():
    spec = ModelSpec(name="mlp", input_shape=(4,), num_classes=2, dropout=0.0,
                     class_names=("ok", "fraud"))
    y = np.array([0] * 95 + [1] * 5)
    binary = tasks.with_task(spec, TaskSettings(name="binary", class_weights="balanced"), y)
    assert binary.class_weights == pytest.approx((19.0,))
    plain = tasks.with_task(spec, TaskSettings(class_weights="balanced"), y)
    assert plain.class_weights == pytest.approx((100 / 190, 100 / 10))


def test_weighted_positives_raise_the_loss_of_a_missed_positive():
    spec = ModelSpec(name="mlp", input_shape=(4,), num_classes=2, dropout=0.0, task="binary")
    weighted = spec.model_copy(update={"class_weights": (10.0,)})
    missed = torch.tensor([[-3.0]])
    target = tasks.targets(spec, np.array([1]))
    assert tasks.loss(weighted, missed, target) == pytest.approx(
        10 * tasks.loss(spec, missed, target))


def test_regression_trains_in_standard_units_and_answers_in_the_users():
    spec = ModelSpec(name="mlp", input_shape=(4,), num_classes=1, dropout=0.0,
                     task="regression", target_mean=(150.0,), target_std=(50.0,))
    assert tasks.targets(spec, np.array([200.0])).item() == pytest.approx(1.0)
    assert tasks.scores(spec, torch.tensor([[1.0]])).item() == pytest.approx(200.0)


@pytest.mark.parametrize("settings, message", [
    ({"name": "regression", "class_weights": "balanced"}, "has none"),
    ({"name": "classification", "threshold": "f1"}, "binary and multilabel"),
    ({"name": "binary", "monitor": "val_mae"}, "val_pr_auc"),
    ({"name": "classification", "loss": "huber"}, "regression loss"),
    ({"name": "multilabel", "positive": "dent"}, "binary's positive"),
])
def test_task_settings_that_contradict_each_other_are_refused(settings, message):
    with pytest.raises(FedgeError, match=message):
        tasks.check_task_settings(TaskSettings(**settings))


def test_the_client_report_flags_a_client_far_behind_the_median():
    clients = {str(k): {"examples": 10, "val_loss": loss}
               for k, loss in enumerate([0.2, 0.25, 0.3, 0.9])}
    rows = client_report({"rounds": [{"round": 1, "clients": clients}]})
    assert [row["lags"] for row in rows] == [False, False, False, True]
    assert client_report({"rounds": [{"round": 1, "clients": None}]}) == []


def test_an_equal_monitored_measure_with_a_lower_loss_is_an_improvement():
    history = [_record(1, 0.50, 1.0), _record(2, 0.30, 1.0), _record(3, 0.40, 1.0)]
    tracker = RoundTracker(None, None, None, patience=3, min_delta=0.0, on_round=None,
                           round_stats=None, monitor="val_pr_auc")
    tracker.resume(history, None)
    assert tracker.best_round == 2  # PR-AUC ties at 1.0; round 2's loss is the lowest


def test_a_client_stops_on_the_monitored_measure_only_where_its_split_measures_it():
    spec = ModelSpec(name="mlp", input_shape=(4,), num_classes=2, dropout=0.0, task="binary")
    few = np.array([0] * 20 + [1] * 2)
    enough = np.array([0] * 20 + [1] * 5)
    assert local_monitor(spec, few, "val_pr_auc") == "val_loss"
    assert local_monitor(spec, enough, "val_pr_auc") == "val_pr_auc"
    regression = spec.model_copy(update={"task": "regression", "num_classes": 1})
    assert local_monitor(regression, np.zeros((3, 1)), "val_mae") == "val_mae"


def test_a_set_lacking_classes_is_named_once_in_one_line(caplog):
    y = np.array([0, 0, 2, 2])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            warn_lacking("the set of a unit test", "classification", y, ("a", "b", "c", "d"), 4)
            measures("classification", np.eye(4)[[0, 0, 2, 2]], y, names=("a", "b", "c", "d"),
                     where="the set of a unit test")
    lines = [r.getMessage() for r in caplog.records if "a unit test" in r.getMessage()]
    assert lines == ["warning: the set of a unit test has no sample of 2 classes: 'b', 'd'; "
                     "the measures that need them are null"]


def test_every_task_the_settings_take_has_its_measures():
    assert get_args(TaskName) == tuple(SCALARS) == tuple(HEADLINE)
