"""After training, per task: the exported model's metadata, `fedge predict`, `fedge
evaluate` (torch-free, measured as scikit-learn measures) and the int8 comparison."""

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn import metrics
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from typer.testing import CliRunner

import fedge
from fedge.cli import app
from fedge.models.export import export_onnx
from fedge.models.inference import TASK_KEY, load_classifier, run_model
from fedge.models.quantize import export_int8
from fedge.models.registry import ModelSpec, build_model, spec_from_data
from fedge.models.tasks import for_export

from conftest import run_python

CANCER, DIABETES, DIGITS = load_breast_cancer(), load_diabetes(), load_digits()
CANCER_NAMES = ("benign", "malignant")  # negative, positive
LABELS = ("big", "even", "round")  # digits ≥ 5; even digits; 0, 6, 8, 9
TARGETS = ("progression", "doubled")


def fedge_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def exported(folder: Path, name: str, x: np.ndarray, outputs: int, **task: object) -> Path:
    """An untrained ``mlp`` for ``task``, exported as fedge exports it."""
    base = spec_from_data("mlp", x, max(outputs, 2), 0.0)
    spec = ModelSpec.model_validate({**base.model_dump(), "num_classes": outputs, **task})
    torch.manual_seed(0)
    path = folder / f"{name}.onnx"
    export_onnx(build_model(spec), spec, x[:64], path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def multilabel_y(digits: np.ndarray) -> np.ndarray:
    return np.stack([digits >= 5, digits % 2 == 0, np.isin(digits, (0, 6, 8, 9))],
                    axis=1).astype(np.int64)


def regression_y() -> np.ndarray:
    return np.stack([DIABETES.target, 2 * DIABETES.target + 1], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    cancer_x, digits_x = CANCER.data.astype(np.float32), DIGITS.data.astype(np.float32)
    targets = regression_y()
    return {
        "classification": exported(folder, "digits", digits_x, 10),
        "binary": exported(folder, "cancer", cancer_x, 2, task="binary",
                           class_names=CANCER_NAMES, threshold=(0.01,)),
        "binary_strict": exported(folder, "cancer_strict", cancer_x, 2, task="binary",
                                  class_names=CANCER_NAMES, threshold=(0.99,)),
        "multilabel": exported(folder, "labels", digits_x, 3, task="multilabel",
                               class_names=LABELS),
        "regression": exported(folder, "diabetes", DIABETES.data.astype(np.float32), 2,
                               task="regression", class_names=TARGETS,
                               target_mean=tuple(targets.mean(axis=0).tolist()),
                               target_std=tuple(targets.std(axis=0).tolist())),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Labelled CSVs per task, as `fedge evaluate` reads them."""
    folder = tmp_path_factory.mktemp("data")
    cancer_names = [CANCER_NAMES[1 - t] for t in CANCER.target]  # sklearn: 0 is malignant
    digit_features = [f"p{i}" for i in range(64)]
    return {
        "classification": write_csv(folder / "digits.csv", [*digit_features, "label"],
                                    [[*row, t] for row, t in zip(DIGITS.data, DIGITS.target,
                                                                  strict=True)]),
        "binary": write_csv(folder / "cancer.csv", [*CANCER.feature_names, "label"],
                            [[*row, name] for row, name in zip(CANCER.data, cancer_names,
                                                               strict=True)]),
        "binary_ids": write_csv(folder / "cancer_ids.csv", ["id", *CANCER.feature_names],
                                [[f"patient-{k}", *row] for k, row in enumerate(CANCER.data)]),
        "multilabel": write_csv(folder / "labels.csv", [*digit_features, *LABELS],
                                [[*row, *labels] for row, labels in zip(
                                    DIGITS.data, multilabel_y(DIGITS.target), strict=True)]),
        "regression": write_csv(folder / "diabetes.csv",
                                [*DIABETES.feature_names, *TARGETS],
                                [[*row, *y] for row, y in zip(DIABETES.data, regression_y(),
                                                              strict=True)]),
    }


def raw_outputs(model: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model)).run(None, {"input": x.astype(np.float32)})[0]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z.astype(np.float64)))


# --- export -----------------------------------------------------------------------------


def test_the_task_its_threshold_and_names_reach_the_onnx_metadata(models):
    stored = onnx.load(str(models["binary"])).metadata_props
    entries = {p.key: p.value for p in stored}
    assert json.loads(entries[TASK_KEY]) == {"task": "binary", "threshold": [0.01],
                                             "names": list(CANCER_NAMES)}
    assert json.loads(entries["fedge.class_names"]) == list(CANCER_NAMES)
    loaded = load_classifier(models["multilabel"])
    assert (loaded.task, loaded.threshold, loaded.class_names) == ("multilabel", None, LABELS)


def test_a_model_without_the_task_entry_is_a_classification_model(models, tmp_path):
    old = onnx.load(str(models["classification"]))
    kept = [p for p in old.metadata_props if p.key != TASK_KEY]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(tmp_path / "old.onnx"))
    x = DIGITS.data[:20].astype(np.float32)

    assert load_classifier(tmp_path / "old.onnx").task == "classification"
    np.testing.assert_array_equal(run_model(tmp_path / "old.onnx", x).classes,
                                  raw_outputs(models["classification"], x).argmax(axis=1))


def test_a_regression_export_is_in_the_users_units_and_matches_torch(tmp_path):
    x, y = DIABETES.data.astype(np.float32), regression_y()
    base = spec_from_data("mlp", x, 2, 0.0)
    spec = ModelSpec.model_validate({**base.model_dump(), "task": "regression",
                                     "target_mean": (150.0, 301.0), "target_std": (77.0, 154.0)})
    torch.manual_seed(0)
    network = build_model(spec)
    report = export_onnx(network, spec, x[:64], tmp_path / "r.onnx")
    with torch.no_grad():
        expected = for_export(network, spec).eval()(torch.as_tensor(x)).numpy()
        logits = network.eval()(torch.as_tensor(x)).numpy()

    values = run_model(tmp_path / "r.onnx", x).scores
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(values, logits * (77.0, 154.0) + (150.0, 301.0), rtol=1e-4,
                               atol=1e-2)
    assert report["max_abs_diff"] <= report["tolerance"] and y.shape == values.shape


# --- predict ----------------------------------------------------------------------------


def test_a_stored_binary_threshold_decides_and_threshold_overrides_it(models, tmp_path):
    x = CANCER.data[:30].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    lenient = fedge_cli("predict", models["binary"], tmp_path / "x.npy")
    strict = fedge_cli("predict", models["binary_strict"], tmp_path / "x.npy")
    overridden = fedge_cli("predict", models["binary"], tmp_path / "x.npy", "--threshold",
                           "0.99")
    probability = sigmoid(raw_outputs(models["binary"], x)[:, 0])
    assert probability.min() > 0.01 and probability.max() < 0.99  # untrained: near 0.5

    assert lenient.exit_code == 0, lenient.output
    assert lenient.stdout.split() == ["malignant"] * 30
    assert strict.stdout.split() == ["benign"] * 30
    assert overridden.stdout == strict.stdout
    at_median = fedge_cli("predict", models["binary"], tmp_path / "x.npy", "--threshold",
                          str(float(np.median(probability))), "--ids")
    assert at_median.stdout.split() == [str(int(p >= np.median(probability)))
                                        for p in probability]


def test_probabilities_are_printed_in_full_float32_precision(models, tmp_path):
    x = CANCER.data[:10].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    printed = fedge_cli("predict", models["binary"], tmp_path / "x.npy", "--probabilities")
    table = list(csv.reader(printed.stdout.splitlines()))

    assert table[0] == ["malignant"]
    shown = np.array([float(row[0]) for row in table[1:]], dtype=np.float32)
    np.testing.assert_array_equal(shown, run_model(models["binary"], x).scores)
    digits = fedge_cli("predict", models["classification"], tmp_path / "x.npy")
    assert digits.exit_code == 2 and "do not fit the model" in digits.stderr


def test_an_id_column_names_each_prediction_and_npz_inputs_are_read(models, data, tmp_path):
    x = CANCER.data.astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    by_id = fedge_cli("predict", models["binary_strict"], data["binary_ids"], "--id-column",
                      "id")
    from_npz = fedge_cli("predict", models["binary_strict"], tmp_path / "x.npz")
    table = fedge_cli("predict", models["binary"], data["binary_ids"], "--id-column", "id",
                      "--probabilities")

    assert by_id.exit_code == 0, by_id.output
    rows = [line.split("\t") for line in by_id.stdout.splitlines()]
    assert [key for key, _ in rows] == [f"patient-{k}" for k in range(len(x))]
    assert [shown for _, shown in rows] == from_npz.stdout.split()
    assert table.stdout.splitlines()[:2] == [
        "id,malignant", f"patient-0,{format(run_model(models['binary'], x[:1]).scores[0], '.9g')}"]
    without_header = fedge_cli("predict", models["binary"], tmp_path / "x.npz", "--id-column",
                               "id")
    assert without_header.exit_code == 2
    assert without_header.stderr.strip() == "error: x.npz is not a .csv file: it has no id " \
                                            "column 'id'"


def test_multilabel_predict_prints_each_samples_set_of_labels(models, tmp_path):
    x = DIGITS.data[:40].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    probability = sigmoid(raw_outputs(models["multilabel"], x))
    cuts = np.quantile(probability, 0.5, axis=0)  # each label on for about half the samples
    text = ",".join(str(float(c)) for c in cuts)

    printed = fedge_cli("predict", models["multilabel"], tmp_path / "x.npy", "--threshold", text)
    ids = fedge_cli("predict", models["multilabel"], tmp_path / "x.npy", "--threshold", text,
                    "--ids")

    assert printed.exit_code == 0, printed.output
    expected = [";".join(name for name, on in zip(LABELS, row >= cuts, strict=True) if on)
                for row in probability]
    assert printed.stdout.splitlines() == expected
    assert "" in expected and any(";" in line for line in expected)  # none, and several
    assert ids.stdout.splitlines() == [";".join(str(LABELS.index(n)) for n in line.split(";")
                                                if n) for line in expected]
    assert fedge.predict(models["multilabel"], x[:3], threshold=list(cuts)) == [
        line.split(";") if line else [] for line in expected[:3]]
    wrong = fedge_cli("predict", models["multilabel"], tmp_path / "x.npy", "--threshold",
                      "0.2,0.4")
    assert wrong.exit_code == 2
    assert wrong.stderr.strip() == "error: the threshold given has 2 values, but the model " \
                                   "has 3 labels"


def test_regression_predict_prints_one_value_per_target(models, tmp_path):
    x = DIABETES.data[:8].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    printed = fedge_cli("predict", models["regression"], tmp_path / "x.npy")
    values = raw_outputs(models["regression"], x)

    assert printed.exit_code == 0, printed.output
    rows = [[np.float32(v) for v in line.split(",")] for line in printed.stdout.splitlines()]
    np.testing.assert_array_equal(np.array(rows, dtype=np.float32), values)
    np.testing.assert_array_equal(fedge.predict(models["regression"], x), values)
    refused = fedge_cli("predict", models["regression"], tmp_path / "x.npy", "--probabilities")
    assert refused.exit_code == 2 and refused.stderr.count("error:") == 1


def test_classification_output_is_unchanged_and_nan_samples_get_no_prediction(models,
                                                                              tmp_path):
    x = DIGITS.data[:6].astype(np.float32)
    x[2, 5] = np.nan
    np.save(tmp_path / "x.npy", x)
    printed = fedge_cli("predict", models["classification"], tmp_path / "x.npy")
    expected = raw_outputs(models["classification"], x).argmax(axis=1).astype(str)
    expected[2] = "-"

    assert printed.exit_code == 1
    assert printed.stdout.split() == list(expected)
    assert printed.stderr.count("error:") == 1 and "sample 3" in printed.stderr
    threshold = fedge_cli("predict", models["classification"], tmp_path / "x.npy",
                          "--threshold", "0.3")
    assert threshold.exit_code == 2 and "takes no threshold" in threshold.stderr


# --- evaluate ---------------------------------------------------------------------------


def evaluated(model: Path, data: Path, *args: str) -> dict:
    result = fedge_cli("evaluate", model, data, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_classification_measures_as_scikit_learn_does(models, data):
    report = evaluated(models["classification"], data["classification"])
    predicted = raw_outputs(models["classification"], DIGITS.data).argmax(axis=1)

    assert report["task"] == "classification" and report["samples"] == len(DIGITS.target)
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(DIGITS.target,
                                                                      predicted))
    assert report["macro_f1"] == pytest.approx(metrics.f1_score(DIGITS.target, predicted,
                                                                average="macro"))
    np.testing.assert_array_equal(report["confusion_matrix"],
                                  metrics.confusion_matrix(DIGITS.target, predicted,
                                                           labels=range(10)))


@pytest.mark.parametrize("threshold", [None, "0.5"])
def test_evaluate_binary_measures_as_scikit_learn_does(models, data, threshold):
    args = () if threshold is None else ("--threshold", threshold)
    report = evaluated(models["binary"], data["binary"], *args)
    truth = 1 - CANCER.target  # malignant is the positive class
    probability = sigmoid(raw_outputs(models["binary"], CANCER.data)[:, 0]).astype(np.float32)
    cut = 0.01 if threshold is None else 0.5
    predicted = (probability >= cut).astype(int)

    assert report["threshold"] == cut
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(truth, predicted))
    assert report["f1"] == pytest.approx(metrics.f1_score(truth, predicted))
    assert report["roc_auc"] == pytest.approx(metrics.roc_auc_score(truth, probability))
    assert report["pr_auc"] == pytest.approx(metrics.average_precision_score(truth,
                                                                             probability))
    assert report == fedge.evaluate(models["binary"], data["binary"],
                                    threshold=None if threshold is None else 0.5)


def test_evaluate_multilabel_measures_as_scikit_learn_does(models, data):
    report = evaluated(models["multilabel"], data["multilabel"], "--threshold", "0.5")
    truth = multilabel_y(DIGITS.target)
    probability = sigmoid(raw_outputs(models["multilabel"], DIGITS.data)).astype(np.float32)
    predicted = (probability >= 0.5).astype(int)

    assert report["task"] == "multilabel" and list(report["per_label"]) == list(LABELS)
    assert report["micro_f1"] == pytest.approx(metrics.f1_score(truth, predicted,
                                                                average="micro"))
    assert report["macro_f1"] == pytest.approx(metrics.f1_score(truth, predicted,
                                                                average="macro"))
    assert report["subset_accuracy"] == pytest.approx(metrics.accuracy_score(truth,
                                                                             predicted))
    assert report["mean_average_precision"] == pytest.approx(
        metrics.average_precision_score(truth, probability, average="macro"))


def test_evaluate_regression_measures_as_scikit_learn_does(models, data):
    report = evaluated(models["regression"], data["regression"])
    truth = regression_y()
    values = raw_outputs(models["regression"], DIABETES.data)

    assert report["mae"] == pytest.approx(metrics.mean_absolute_error(truth, values),
                                          rel=1e-5)
    assert report["r2"] == pytest.approx(metrics.r2_score(truth, values), rel=1e-5)
    assert report["per_target"]["doubled"]["rmse"] == pytest.approx(
        metrics.root_mean_squared_error(truth[:, 1], values[:, 1]), rel=1e-5)
    printed = fedge_cli("evaluate", models["regression"], data["regression"])
    assert printed.exit_code == 0 and "per target" in printed.stdout


def test_evaluate_prints_the_report_and_strict_json(models, data):
    printed = fedge_cli("evaluate", models["binary"], data["binary"])
    as_json = fedge_cli("evaluate", models["binary_strict"], data["binary"], "--json")

    assert printed.exit_code == 0, printed.output
    for shown in ("binary, 569 samples, threshold 0.01", "pr_auc", "per class",
                  "confusion matrix", "malignant"):
        assert shown in printed.stdout
    assert "NaN" not in as_json.stdout
    report = json.loads(as_json.stdout)
    assert report["precision"] is None  # threshold 0.99: nothing predicted positive


def test_evaluate_runs_without_torch(models, data):
    # A device may only have onnxruntime: any import of torch fails (a meta path finder,
    # since libraries test sys.modules for torch, which a None entry there would break).
    code = textwrap.dedent("""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("no torch on this device")

        sys.meta_path.insert(0, NoTorch())
        from fedge.cli import app
        sys.argv[0] = "fedge"
        app()
    """)
    result = run_python(code, "evaluate", str(models["binary"]), str(data["binary"]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task"] == "binary"
    imported = run_python("import sys, fedge; fedge.evaluate(sys.argv[1], sys.argv[2]); "
                          "print('torch' in sys.modules)", str(models["regression"]),
                          str(data["regression"]))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "False"


@pytest.mark.parametrize("args, message", [
    (["missing.csv"], "no such file or folder: missing.csv"),
    (["DATA", "--threshold", "1.5"], "--threshold must be a value between 0 and 1, or one "
                                     "per label separated by commas, not '1.5'"),
    (["DATA", "--label-column", "diagnosis"], "has no 'diagnosis' column"),
])
def test_bad_evaluation_input_is_one_error_line(models, data, args, message):
    args = [str(data["binary"]) if a == "DATA" else a for a in args]
    result = fedge_cli("evaluate", models["binary"], *args)

    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1 and message in result.stderr
    assert "Traceback" not in result.output


def test_evaluation_labels_must_fit_the_model(models, data, tmp_path):
    np.savez(tmp_path / "wide.npz", x=DIGITS.data[:10].astype(np.float32),
             y=np.zeros((10, 2), dtype=np.int64))
    result = fedge_cli("evaluate", models["multilabel"], tmp_path / "wide.npz")

    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1 and "has 2 labels per sample" in result.stderr


# --- int8 -------------------------------------------------------------------------------


def test_int8_is_compared_with_fp32_by_the_tasks_headline_measure(tmp_path):
    x = CANCER.data.astype(np.float32)
    base = spec_from_data("mlp", x, 2, 0.0)
    spec = ModelSpec.model_validate({**base.model_dump(), "task": "binary",
                                     "class_names": CANCER_NAMES})
    torch.manual_seed(0)
    y = 1 - CANCER.target

    report = export_int8(build_model(spec), spec, x[:64], tmp_path / "q.onnx", "dynamic", x, y)

    assert report["task"] == "binary" and report["measure"] == "pr_auc"
    probability = run_model(tmp_path / "q.onnx", x).scores
    assert report["int8"]["pr_auc"] == pytest.approx(metrics.average_precision_score(
        y, probability))
    assert 0.5 <= report["agreement"] <= 1.0
