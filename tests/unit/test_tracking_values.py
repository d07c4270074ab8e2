"""What fedge's trackers are given: targets, metric names, a round's numbers, settings."""

import math

import pytest

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.server.tracking import round_metrics, settings_as_params
from fedge.tracking import Target, check_targets, metric_name, scalars


def test_a_target_names_its_tracker_and_optionally_its_place():
    assert Target.parse("mlflow") == Target("mlflow", None)
    assert Target.parse("mlflow:http://host:5000") == Target("mlflow", "http://host:5000")
    assert Target.parse("tensorboard:tb/") == Target("tensorboard", "tb/")
    assert str(Target.parse("mlflow:sqlite:///m.db")) == "mlflow:sqlite:///m.db"
    for bad in ("wandb", "mlflow:", "tensorboard:"):
        with pytest.raises(FedgeError, match="expected mlflow"):
            Target.parse(bad)


def test_the_same_tracker_twice_and_file_stores_are_refused():
    with pytest.raises(FedgeError, match="the same tracker twice"):
        check_targets(["tensorboard", "tensorboard"])
    with pytest.raises(FedgeError, match="no longer takes file stores"):
        check_targets(["mlflow:file:///tmp/mlruns"])
    assert [t.kind for t in check_targets(["mlflow", "tensorboard:tb"])] == ["mlflow",
                                                                             "tensorboard"]


def test_the_track_setting_is_checked_with_the_run_configuration():
    assert RunConfig(track="mlflow").tracking.track == ["mlflow"]
    with pytest.raises(ValueError, match="is no tracker"):
        RunConfig(track=["mlflow", "comet"])


def test_only_finite_numbers_become_metrics_and_tables_one_level_deep():
    found = scalars({"loss": 0.5, "nan": math.nan, "none": None, "flag": True, "text": "x",
                     "f1": {"cat dog": 0.25, "bird": None, "n/a": 0.5, "..": 0.75}},
                    prefix="val_")
    assert found == {"val_loss": 0.5, "val_f1/cat dog": 0.25, "val_f1/n_a": 0.5,
                     "val_f1/_": 0.75}
    assert metric_name("client/3/val_f1 (macro)") == "client/3/val_f1 _macro_"


def test_a_round_gives_the_servers_measures_counts_and_each_clients_report():
    record = {"round": 4, "train_loss": 0.9, "val_loss": 0.7, "val_accuracy": 0.8,
              "num_clients": 3, "failures": 1, "timeouts": 0, "rejected": 0, "seconds": 1.5,
              "epsilon": None, "bytes_per_client": 1024.0, "contributions": {"python": {}},
              "val_measures": {"accuracy": 0.8, "macro_f1": 0.6, "loss": 0.7,
                               "recall": {"0": 0.5, "1": 0.9}},
              "clients": {"7": {"examples": 40, "train_loss": 1.1}}}
    found = round_metrics(record, staleness=[0, 2, 1])
    assert found["val_loss"] == 0.7 and found["val_accuracy"] == 0.8
    assert found["val_macro_f1"] == 0.6 and found["val_recall/1"] == 0.9
    assert found["failures"] == 1 and found["bytes_per_client"] == 1024.0
    assert found["client/7/train_loss"] == 1.1 and found["client/7/examples"] == 40
    assert found["staleness_mean"] == 1.0 and found["staleness_max"] == 2.0
    assert "round" not in found and "epsilon" not in found and "val_val_loss" not in found


def test_settings_become_parameters_by_section():
    params = settings_as_params(RunConfig(lr=0.01, rounds=7, reset=["head.*", "fc.*"]))
    assert params["training.lr"] == "0.01" and params["strategy.rounds"] == "7"
    assert params["model.reset"] == "head.*,fc.*" and params["seed"] == "0"
    assert "model.init" not in params  # unset: None is no parameter


def test_what_a_tracker_lacks_is_said_in_order_with_rounds_as_ranges():
    from fedge.tracking import _listed

    assert _listed(["the run's start", "round 1", "round 2", "round 3", "the artifacts"]) \
        == "the run's start, round 1 to round 3, the artifacts"
    assert _listed(["epoch 4", "round 2"]) == "epoch 4, round 2"


def test_a_servers_tracker_folders_are_made_absolute_and_uris_left_alone(tmp_path,
                                                                          monkeypatch):
    from fedge.tracking import with_absolute_place

    monkeypatch.chdir(tmp_path)
    assert with_absolute_place("tensorboard:tb") == f"tensorboard:{tmp_path / 'tb'}"
    assert with_absolute_place("mlflow:store") == f"mlflow:{tmp_path / 'store'}"
    for kept in ("mlflow", "tensorboard", "mlflow:http://h:5000", "mlflow:sqlite:///a.db"):
        assert with_absolute_place(kept) == kept
