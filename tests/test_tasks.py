"""Tasks beyond classification, end to end: a rare-positive binary task, regression and
multi-label, each trained, judged by its own measures, exported with what `fedge predict`
needs, in the modes a federation runs in."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

import fedge
from fedge.models.inference import load_classifier

from conftest import run_fedge

TINY = {"rounds": 3, "local_epochs": 2, "clients": 4, "partition": "iid", "patience": 5,
        "model": "mlp", "lr": 0.01, "seed": 1}


def _write_csv(path, x, labels: dict) -> str:
    """Samples as a CSV with feature columns f0.. and the given label columns."""
    header = [f"f{k}" for k in range(x.shape[1])] + list(labels)
    rows = [",".join([*map(repr, map(float, row)), *(str(v[i]) for v in labels.values())])
            for i, row in enumerate(x)]
    path.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def fraud_csv(tmp_path_factory) -> str:
    """Breast cancer with few malignant samples (about 7 %), tiled with small jitter so
    that every hold-out and most clients see some."""
    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    benign = np.flatnonzero(data.target == 1)
    malignant = np.flatnonzero(data.target == 0)[:25]
    rows = np.concatenate([benign, malignant, malignant])
    x = data.data[rows] * rng.normal(1.0, 0.01, (len(rows), data.data.shape[1]))
    names = np.where(data.target[rows] == 0, "malignant", "benign")
    return _write_csv(tmp_path_factory.mktemp("fraud") / "parts.csv", x, {"diagnosis": names})


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory) -> str:
    data = load_diabetes()
    return _write_csv(tmp_path_factory.mktemp("diabetes") / "diabetes.csv", data.data,
                      {"progression": data.target})


@pytest.fixture(scope="module")
def multilabel_csv(tmp_path_factory) -> str:
    """Digits with two labels each may have: ``even`` and ``large`` (5 and up)."""
    data = load_digits()
    sets = [";".join(name for name, on in (("even", d % 2 == 0), ("large", d >= 5)) if on)
            for d in data.target[:900]]
    return _write_csv(tmp_path_factory.mktemp("multilabel") / "digits.csv",
                      data.data[:900], {"label": sets})


@pytest.fixture(scope="module")
def binary_run(fraud_csv, tmp_path_factory):
    return fedge.simulate(data=fraud_csv, label_column="diagnosis", task="binary",
                          positive="malignant", class_weights="balanced",
                          monitor="val_pr_auc", threshold="recall:0.8",
                          out=tmp_path_factory.mktemp("binary") / "run", **TINY)


def test_a_binary_run_is_judged_by_its_ranking_and_its_positives(binary_run):
    metrics = json.loads((binary_run.run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) >= {"pr_auc", "roc_auc", "precision", "recall", "f1", "confusion_matrix"}
    assert binary_run.test["pr_auc"] == test["pr_auc"] > 0.5
    assert sum(test["confusion_matrix"][1]) > 0  # the test set holds positives
    assert metrics["model_spec"]["class_names"] == ["benign", "malignant"]
    assert metrics["model_spec"]["class_weights"][0] > 5  # negatives per positive


def best_by_pr_auc(rounds: list[dict]) -> int:
    """The round with the highest validation PR-AUC; of equal ones, the lowest loss."""
    return min(rounds, key=lambda r: (-r["val_measures"]["pr_auc"], r["val_loss"]))["round"]


def test_the_monitored_measure_picks_the_best_round(binary_run):
    assert binary_run.best_round == best_by_pr_auc(binary_run.rounds)


def test_the_chosen_threshold_travels_with_the_model_and_predict_applies_it(binary_run,
                                                                            fraud_csv):
    onnx_model = onnx.load(str(binary_run.onnx_model))
    stored = {p.key: p.value for p in onnx_model.metadata_props}
    threshold = json.loads(stored["fedge.task"])["threshold"]
    assert len(threshold) == 1 and 0 < threshold[0] < 1
    assert load_classifier(binary_run.onnx_model)  # onnxruntime takes it
    low = run_fedge("predict", str(binary_run.onnx_model), fraud_csv, "--threshold", "0.001")
    high = run_fedge("predict", str(binary_run.onnx_model), fraud_csv, "--threshold", "0.999")
    assert low.returncode == high.returncode == 0, low.stderr + high.stderr
    assert low.stdout.count("malignant") > high.stdout.count("malignant")


def test_every_round_records_each_clients_own_metrics_and_report_shows_them(binary_run):
    for record in binary_run.rounds:
        assert sorted(record["clients"], key=int) == ["0", "1", "2", "3"]
        assert all("val_loss" in c and "train_loss" in c for c in record["clients"].values())
    shown = run_fedge("report", str(binary_run.run_dir))
    assert shown.returncode == 0, shown.stderr
    assert "4 clients; lagging:" in shown.stdout


def test_a_run_names_the_class_its_validation_set_lacks_once_as_it_starts(fraud_csv,
                                                                          tmp_path):
    header, *rows = Path(fraud_csv).read_text().splitlines()
    benign_only = tmp_path / "val.csv"
    benign_only.write_text("\n".join([header, *[r for r in rows if r.endswith(",benign")][:60]]))
    result = run_fedge("simulate", "--data", fraud_csv, "--val-data", str(benign_only),
                       "--label-column", "diagnosis", "--rounds", "2", "--clients", "3",
                       "--model", "mlp", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "validation set has no" in line]
    assert warned == ["warning: the server's validation set has no sample of class "
                      "'malignant'; the measures that need it are null"]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][0]
    assert record["val_measures"]["per_class"]["malignant"]["recall"] is None


def test_a_regression_run_answers_in_the_users_units(diabetes_csv, tmp_path):
    result = fedge.simulate(data=diabetes_csv, label_column="progression", task="regression",
                            out=tmp_path / "run", **{**TINY, "rounds": 4})
    assert set(result.test) >= {"mae", "rmse", "r2"} and result.test_accuracy is None
    target = load_diabetes().target
    assert result.test["mae"] < target.std()  # better than knowing nothing but the mean
    predicted = run_fedge("predict", str(result.onnx_model), diabetes_csv)
    assert predicted.returncode == 0, predicted.stderr
    values = np.array([float(line.split()[-1]) for line in predicted.stdout.split()[:50]])
    assert abs(values.mean() - target.mean()) < target.std()  # units, not standard units


def test_a_multilabel_run_learns_each_label(multilabel_csv, tmp_path):
    result = fedge.simulate(data=multilabel_csv, task="multilabel", out=tmp_path / "run",
                            **TINY)
    assert result.test["micro_f1"] > 0.6
    assert set(result.test["per_label"]) == {"even", "large"}


@pytest.mark.parametrize("task, settings", [
    ("binary", {"vectorize": True}),
    ("binary", {"strategy": "fedbuff", "compress": "int8"}),
    ("regression", {"workers": 2, "strategy": "krum", "krum_byzantine": 0}),
    ("regression", {"dp_clip_norm": 5.0, "dp_noise_multiplier": 0.01, "clients": 4,
                    "min_clients": 4}),
    ("multilabel", {"secagg": True, "clients": 4, "min_clients": 4}),
    ("multilabel", {"strategy": "fedadam", "vectorize": True}),
])
def test_each_task_runs_in_every_mode(task, settings, fraud_csv, diabetes_csv, multilabel_csv,
                                      tmp_path):
    data = {"binary": (fraud_csv, "diagnosis"), "regression": (diabetes_csv, "progression"),
            "multilabel": (multilabel_csv, "label")}[task]
    result = fedge.simulate(data=data[0], label_column=data[1], task=task,
                            out=tmp_path / "run", **{**TINY, "rounds": 2, **settings})
    headline = {"binary": "pr_auc", "regression": "rmse", "multilabel": "micro_f1"}[task]
    assert result.rounds_run >= 1 and result.test[headline] is not None  # fedbuff: versions
    private = "dp_clip_norm" in settings
    assert all((r["clients"] is None) == private for r in result.rounds)


class Interrupted(Exception):
    """Stands for a crash between rounds."""


def test_an_interrupted_binary_run_resumes_with_its_task_and_its_best_round(fraud_csv,
                                                                           tmp_path):
    settings = {**TINY, "rounds": 3, "task": "binary", "positive": "malignant",
                "monitor": "val_pr_auc", "threshold": "f1", "label_column": "diagnosis"}

    def crash_after_round_two(record, best) -> None:
        if record.round == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fedge.simulate(data=fraud_csv, out=tmp_path / "run", on_round=crash_after_round_two,
                       **settings)
    result = fedge.simulate(data=fraud_csv, out=tmp_path / "run", resume=True, **settings)
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    assert result.best_round == best_by_pr_auc(result.rounds)
    metadata = {p.key: p.value for p in onnx.load(str(result.onnx_model)).metadata_props}
    assert json.loads(metadata["fedge.task"])["task"] == "binary"
