"""Labels per task: how each file format's labels are read for classification, binary,
multilabel and regression, and how hold-outs and local splits keep rare classes."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_diabetes

from fedge.client.data import split_train_val
from fedge.client.deployment import DeviceData
from fedge.config import RunConfig
from fedge.datafiles import binary_labels, load_labelled_data, remap_labels
from fedge.errors import FedgeError
from fedge.models.measures import lacking
from fedge.server.deployment import ServerSettings, load_server_data
from fedge.simulations.datasets import for_task, load_dataset
from fedge.simulations.runner import _plan_data
from fedge.simulations.userdata import (
    UserData,
    fit_config,
    split_user_data,
)


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def cancer_csv(path: Path, rows: np.ndarray, extra: dict[str, list] | None = None,
               label: str = "diagnosis") -> Path:
    """breast_cancer ``rows``: 30 features, the diagnosis by name, and ``extra`` columns."""
    cancer = load_breast_cancer()
    extra = extra or {}
    header = [*cancer.feature_names, label, *extra]
    table = [[*cancer.data[r], cancer.target_names[cancer.target[r]],
              *(values[k] for values in extra.values())] for k, r in enumerate(rows)]
    return write_csv(path, header, table)


def diabetes_csv(path: Path) -> Path:
    """scikit-learn's diabetes data: 10 features and the disease progression a year on."""
    diabetes = load_diabetes()
    header = [*diabetes.feature_names, "progression"]
    return write_csv(path, header, np.column_stack([diabetes.data, diabetes.target]).tolist())


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


# --- classification: numbers that are no classes ---------------------------------------


def test_a_column_of_many_distinct_integers_is_refused_suggesting_regression(tmp_path):
    path = write_csv(tmp_path / "ages.csv", ["a", "label"], [[i / 10, 20 + i] for i in range(344)])
    with pytest.raises(FedgeError, match=r"has 344 distinct integer labels \(20, 21, 22, "
                                         r"\.\.\.\), more than 100 classes: for numeric "
                                         r"targets use --task regression"):
        load_labelled_data(path)


def test_the_diabetes_targets_are_refused_as_classes_and_fractions_suggest_regression(
        tmp_path):
    with pytest.raises(FedgeError, match=r"distinct integer labels .* use --task regression"):
        load_labelled_data(diabetes_csv(tmp_path / "d.csv"), label_column="progression")
    path = write_csv(tmp_path / "f.csv", ["a", "label"], [[0.1, 0.25], [0.2, 1]])
    with pytest.raises(FedgeError, match=r"has label 0.25, but labels must be integer class "
                                         r"ids .*; for numeric targets use --task regression"):
        load_labelled_data(path)


def test_several_label_columns_are_for_multilabel_or_regression(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "a", "b"], [[0.1, 0, 1]])
    with pytest.raises(FedgeError, match=r"names 2 columns, but a classification task has one "
                                         r"label per sample; .*--task multilabel"):
        load_labelled_data(path, label_column="a,b")
    np.savez(tmp_path / "m.npz", x=np.zeros((2, 3)), y=np.eye(2, dtype=int))
    with pytest.raises(FedgeError, match=r"labels of shape \(2,\) per sample, but a binary "
                                         r"task has one class per sample"):
        load_labelled_data(tmp_path / "m.npz", task="binary")


# --- multilabel ------------------------------------------------------------------------


def test_multilabel_csv_columns_of_0_1_keep_the_given_order_and_are_no_features(tmp_path):
    rows = [[0.5, 1, 0, 1.5], [0.7, 0, 1, 2.5], [0.9, 1, 1, 3.5]]
    path = write_csv(tmp_path / "d.csv", ["f1", "cat", "dog", "f2"], rows)

    samples = load_labelled_data(path, label_column="dog, cat", task="multilabel")

    assert samples.class_names == ("dog", "cat")
    assert samples.y.dtype == np.int64
    np.testing.assert_array_equal(samples.y, [[0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(samples.x, np.float32([[0.5, 1.5], [0.7, 2.5], [0.9, 3.5]]))


def test_multilabel_csv_names_separated_by_semicolons_empty_for_none(tmp_path):
    rows = [[0.1, "cat;dog"], [0.2, ""], [0.3, " dog "], [0.4, "bird; cat"]]
    path = write_csv(tmp_path / "d.csv", ["a", "label"], rows)

    samples = load_labelled_data(path, task="multilabel")

    assert samples.class_names == ("bird", "cat", "dog")
    np.testing.assert_array_equal(samples.y, [[0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 0]])


def test_multilabel_names_take_the_federations_order_and_unknown_ones_are_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.1, "cat;dog"], [0.2, "dog"]])

    samples = load_labelled_data(path, task="multilabel", class_names=["dog", "fish", "cat"])

    assert samples.class_names == ("dog", "fish", "cat")
    np.testing.assert_array_equal(samples.y, [[1, 0, 1], [1, 0, 0]])
    with pytest.raises(FedgeError, match=r"has a class the federation does not know: cat"):
        load_labelled_data(path, task="multilabel", class_names=["dog", "fish"])


def test_multilabel_npz_matrix_is_unnamed_and_values_must_be_0_or_1(tmp_path):
    y = np.array([[1, 0, 0], [0, 1, 1]], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4)), y=y)

    samples = load_labelled_data(tmp_path / "d.npz", task="multilabel")

    assert samples.class_names is None and samples.y.dtype == np.int64
    np.testing.assert_array_equal(samples.y, y)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4)), y=np.array([[1, 2], [0, 1]]))
    with pytest.raises(FedgeError, match=r"has label 2, but a multilabel task takes 0 or 1"):
        load_labelled_data(tmp_path / "bad.npz", task="multilabel")


def test_multilabel_csv_columns_must_hold_0_or_1(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "a", "b"], [[0.1, 0, 1], [0.2, 3, 0]])
    with pytest.raises(FedgeError, match=r"has label 3, but a multilabel task takes 0 or 1"):
        load_labelled_data(path, label_column="a,b", task="multilabel")
    path = write_csv(tmp_path / "e.csv", ["x", "a", "b"], [[0.1, 0, 1], [0.2, "", 0]])
    with pytest.raises(FedgeError, match=r"line 3 of .*e\.csv has no label in column 'a'"):
        load_labelled_data(path, label_column="a,b", task="multilabel")


def test_multilabel_image_folders_are_named_by_their_labels_and_none_has_none(tmp_path):
    write_image(tmp_path / "imgs" / "cat;dog" / "1.png", 10)
    write_image(tmp_path / "imgs" / "none" / "2.png", 20)
    write_image(tmp_path / "imgs" / "dog" / "3.png", 30)

    samples = load_labelled_data(tmp_path / "imgs", task="multilabel")

    assert samples.class_names == ("cat", "dog")
    by_pixel = {int(x[0, 0, 0]): tuple(y) for x, y in zip(samples.x, samples.y, strict=True)}
    assert by_pixel == {10: (1, 1), 20: (0, 0), 30: (0, 1)}


# --- regression ------------------------------------------------------------------------


def test_diabetes_progression_is_a_regression_target(tmp_path):
    diabetes = load_diabetes()

    samples = load_labelled_data(diabetes_csv(tmp_path / "d.csv"), label_column="progression",
                                 task="regression")

    assert samples.y.dtype == np.float32 and samples.y.shape == (442, 1)
    assert samples.class_names == ("progression",)
    np.testing.assert_allclose(samples.y[:, 0], diabetes.target, rtol=1e-6)
    assert samples.x.shape == (442, 10)


def test_several_regression_targets_and_npz_targets(tmp_path):
    rows = [[0.1, 1.5, -2.0], [0.2, 2.5, 3.25]]
    path = write_csv(tmp_path / "d.csv", ["x", "price", "days"], rows)

    samples = load_labelled_data(path, label_column="days,price", task="regression")

    assert samples.class_names == ("days", "price")
    np.testing.assert_array_equal(samples.y, np.float32([[-2.0, 1.5], [3.25, 2.5]]))
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0.5, 1.5, 2.5]))
    from_npz = load_labelled_data(tmp_path / "d.npz", task="regression")
    assert from_npz.y.shape == (3, 1) and from_npz.class_names is None


def test_regression_refuses_text_targets_and_image_folders(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "label"], [[0.1, "high"], [0.2, "low"]])
    with pytest.raises(FedgeError, match=r"line 2 of .*d\.csv holds 'high' in column 'label', "
                                         r"which is not a number"):
        load_labelled_data(path, task="regression")
    np.savez(tmp_path / "t.npz", x=np.zeros((2, 2)), y=np.array(["a", "b"]))
    with pytest.raises(FedgeError, match=r"a regression task needs numeric targets"):
        load_labelled_data(tmp_path / "t.npz", task="regression")
    write_image(tmp_path / "imgs" / "cat" / "1.png", 10)
    with pytest.raises(FedgeError, match=r"is an image folder, whose sub-folders name classes: "
                                         r"a regression task needs numeric targets"):
        load_labelled_data(tmp_path / "imgs", task="regression")


def test_a_devices_targets_take_the_federations_order_and_none_may_be_missing():
    y = np.float32([[1, 2], [3, 4]])
    np.testing.assert_array_equal(remap_labels(y, ("a", "b"), ("b", "a"), "dev"), y[:, ::-1])
    with pytest.raises(FedgeError, match=r"dev has no target c; the federation's model "
                                         r"predicts: a, b, c"):
        remap_labels(y, ("a", "b"), ("a", "b", "c"), "dev")


def test_label_columns_are_the_csvs_non_feature_columns():
    data = UserData(label_column="a, b", task="multilabel", group_column="site")
    assert data.non_feature_columns == ("a", "b", "site")


# --- binary ----------------------------------------------------------------------------


def test_binary_positive_is_the_rarest_class_unless_named():
    y = np.array([0, 1, 1, 1, 0, 1])
    (as01,), names = binary_labels([y], ("cat", "dog"), None, y, "d.csv")
    assert names == ("dog", "cat")
    np.testing.assert_array_equal(as01, [1, 0, 0, 0, 1, 0])
    (as01,), names = binary_labels([y], ("cat", "dog"), "dog", y, "d.csv")
    assert names == ("cat", "dog")
    np.testing.assert_array_equal(as01, y)
    (as01,), names = binary_labels([y], ("cat", "dog"), "1", y, "d.csv")
    assert names == ("cat", "dog")


def test_binary_unnamed_ids_are_named_by_number_and_ties_make_the_later_positive():
    y = np.array([3, 7, 3, 7])
    (as01,), names = binary_labels([y], None, None, y, "d.npz")
    assert names == ("3", "7")
    np.testing.assert_array_equal(as01, [0, 1, 0, 1])
    (as01,), names = binary_labels([y], None, "3", y, "d.npz")
    assert names == ("7", "3")
    np.testing.assert_array_equal(as01, [1, 0, 1, 0])


def test_binary_needs_exactly_2_classes_and_a_known_positive():
    with pytest.raises(FedgeError, match=r"^binary needs 2 classes; d\.csv has 3: a, b, c$"):
        binary_labels([np.array([0, 1, 2])], ("a", "b", "c"), None, np.array([0]), "d.csv")
    with pytest.raises(FedgeError, match=r"positive class 'fraud' is neither of the 2 classes"):
        binary_labels([np.array([0, 1])], ("a", "b"), "fraud", np.array([0, 1]), "d.csv")


def test_breast_cancer_binary_positive_is_malignant_and_digits_or_regression_are_refused():
    cancer = for_task(load_dataset("breast_cancer"), "binary")
    assert cancer.class_names == ("benign", "malignant")
    assert cancer.y.sum() == 212  # the malignant samples
    with pytest.raises(FedgeError, match=r"^binary needs 2 classes; data set 'digits' has 10"):
        for_task(load_dataset("digits"), "binary")
    with pytest.raises(FedgeError, match=r"a regression task needs your own data: give it "
                                         r"with --data"):
        for_task(load_dataset("digits"), "regression")


def test_a_binary_built_in_plan_gives_server_and_clients_0_1(tmp_path):
    plan = _plan_data(RunConfig(dataset="breast_cancer", task="binary", clients=3), None)
    assert plan.server_data.class_names == ("benign", "malignant")
    assert plan.server_data.num_classes == 2
    assert set(plan.server_data.val_y.tolist()) == {0, 1}
    from flwr.app import Context, RecordDict
    local = plan.clients.local_data(Context(run_id=1, node_id=0, state=RecordDict(),
                                            node_config={"partition-id": 0}, run_config={}))
    assert set(np.concatenate([local.train_y, local.val_y]).tolist()) <= {0, 1}


def test_a_binary_csv_split_gives_0_1_everywhere_with_names(tmp_path):
    path = cancer_csv(tmp_path / "c.csv", np.arange(300))
    split = split_user_data(UserData(data=str(path), label_column="diagnosis", task="binary",
                                     positive="benign"))
    assert split.class_names == ("malignant", "benign") and split.num_classes == 2
    for y in (split.y, split.val_y, split.test_y):
        assert y.dtype == np.int64 and set(y.tolist()) == {0, 1}


def test_a_binary_device_keeps_its_classes_by_name_numbers_included(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[i, i % 2] for i in range(10)])
    data = DeviceData(path, val_fraction=0.3, task="binary").load()
    assert data.class_names == ("0", "1")
    three = write_csv(tmp_path / "t.csv", ["a", "label"], [[i, i % 3] for i in range(9)])
    with pytest.raises(FedgeError, match=r"^binary needs 2 classes; .*t\.csv has 3: 0, 1, 2$"):
        DeviceData(three, task="binary").load()


def test_the_deployment_servers_binary_labels_and_label_columns(tmp_path):
    path = cancer_csv(tmp_path / "val.csv", np.arange(100))  # 65 malignant, 35 benign
    config = RunConfig(task="binary", label_column="diagnosis", model="mlp")
    server = load_server_data(ServerSettings(config=config, val_data=path, run_dir=tmp_path))
    assert server.class_names == ("malignant", "benign") and server.num_classes == 2
    assert server.val_y.sum() == 35 and server.test_y.sum() == 35
    named = config.updated(positive="malignant")
    server = load_server_data(ServerSettings(config=named, val_data=path, run_dir=tmp_path))
    assert server.class_names == ("benign", "malignant") and server.val_y.sum() == 65
    assert server.non_feature_columns == ("diagnosis",)


# --- honest splits ---------------------------------------------------------------------


def test_stratified_hold_outs_keep_a_rare_class_in_validation_and_test(tmp_path):
    rows = [[i / 400, "fraud" if i % 100 == 7 else "ok"] for i in range(400)]
    path = write_csv(tmp_path / "d.csv", ["amount", "label"], rows)

    split = split_user_data(UserData(data=str(path), task="binary"))

    assert split.class_names == ("ok", "fraud")
    assert split.val_y.sum() >= 1 and split.test_y.sum() >= 1
    assert split.y.sum() + split.val_y.sum() + split.test_y.sum() == 4
    assert lacking("binary", split.val_y, split.class_names, 2) == []
    assert lacking("binary", split.test_y, split.class_names, 2) == []


def test_multilabel_hold_outs_keep_a_rare_label(tmp_path):
    rows = [[i, "a;rare" if i % 50 == 3 else ("a;b" if i % 2 else "b")] for i in range(200)]
    path = write_csv(tmp_path / "d.csv", ["x", "label"], rows)

    split = split_user_data(UserData(data=str(path), task="multilabel"))

    assert split.class_names == ("a", "b", "rare") and split.num_classes == 3
    assert split.val_y[:, 2].sum() >= 1 and split.test_y[:, 2].sum() >= 1
    assert split.y.shape[1] == split.val_y.shape[1] == 3


def test_regression_hold_outs_stratify_by_quantiles_even_with_few_samples(tmp_path):
    split = split_user_data(UserData(data=str(diabetes_csv(tmp_path / "d.csv")),
                                     label_column="progression", task="regression"))
    assert split.y.dtype == np.float32 and split.num_classes == 1
    assert split.val_y.shape == (67, 1)
    # Each tenth of the targets has its share in the validation set.
    edges = np.quantile(load_diabetes().target, [0.1, 0.9])
    assert (split.val_y < edges[0]).sum() >= 4 and (split.val_y > edges[1]).sum() >= 4
    small = write_csv(tmp_path / "s.csv", ["x", "y"], [[i, i * 1.5] for i in range(9)])
    few = split_user_data(UserData(data=str(small), label_column="y", task="regression"))
    assert len(few.val_y) + len(few.test_y) + len(few.y) == 9


def test_classes_of_one_sample_are_pooled_rather_than_refused(tmp_path):
    rows = [[i, "common" if i < 60 else f"rare{i}"] for i in range(62)]
    path = write_csv(tmp_path / "d.csv", ["x", "label"], rows)
    split = split_user_data(UserData(data=str(path)))
    assert len(split.y) + len(split.val_y) + len(split.test_y) == 62


def test_a_validation_file_without_a_class_is_kept_and_the_class_named(tmp_path):
    pool = cancer_csv(tmp_path / "pool.csv", np.arange(200))
    benign = np.flatnonzero(load_breast_cancer().target == 1)[-30:]
    val = cancer_csv(tmp_path / "val.csv", benign)
    source = UserData(data=str(pool), val_data=str(val), label_column="diagnosis")

    split = split_user_data(source)
    assert lacking("classification", split.val_y, split.class_names, 2) == ["malignant"]


def test_missing_labels_of_a_multilabel_set_are_named():
    y = np.array([[1, 0], [0, 1]])
    assert lacking("multilabel", y[:1], ("cat", "dog"), 2) == ["dog"]
    assert lacking("multilabel", y, ("cat", "dog"), 2) == []


def test_fit_config_checks_each_tasks_outputs(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["x", "label"], [[i, "a;b"] for i in range(20)])
    source = UserData(data=str(path), task="multilabel")
    split = split_user_data(source)
    config = RunConfig(data=str(path), task="multilabel", num_classes=3)
    with pytest.raises(FedgeError, match=r"num_classes 3 does not match the 2 labels of the "
                                         r"data: a, b"):
        fit_config(config, source, split)
    empty = write_csv(tmp_path / "e.csv", ["x", "label"], [[i, ""] for i in range(20)])
    with pytest.raises(FedgeError, match=r"has no label in column 'label'"):
        split_user_data(UserData(data=str(empty), task="multilabel"))


def test_local_validation_holds_a_rare_positive_when_there_is_room():
    x, y = np.arange(10, dtype=np.float32)[:, None], np.array([0] * 8 + [1] * 2)
    for seed in range(10):
        data = split_train_val(x, y, val_fraction=0.3, seed=seed)
        assert data.val_y.sum() == 1 and data.train_y.sum() == 1
        assert sorted(np.concatenate([data.train_x, data.val_x])[:, 0]) == list(range(10))


def test_local_splits_fall_back_to_random_and_stratify_multilabel_by_rarest_label():
    x = np.arange(12, dtype=np.float32)[:, None]
    lone = split_train_val(x, np.array([0] * 11 + [1]), val_fraction=0.25, seed=0)
    assert len(lone.val_y) == 3 and len(lone.train_y) == 9
    labels = np.zeros((12, 2), dtype=np.int64)
    labels[:, 0], labels[[2, 9], 1] = 1, 1
    for seed in range(5):
        data = split_train_val(x, labels, val_fraction=0.34, seed=seed)
        assert len(data.val_y) == 4 and data.val_y[:, 1].sum() == 1
    targets = np.linspace(0, 1, 12, dtype=np.float32)[:, None]
    assert len(split_train_val(x, targets, val_fraction=0.25).val_y) == 3
