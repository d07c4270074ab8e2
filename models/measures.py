"""The measures a task is judged by, from a model's scores and the true labels.

Torch-free (numpy and scikit-learn), so that ``fedge evaluate`` on a device needs only
onnxruntime. Scores are what :func:`fedge.models.tasks.scores` gives: class probabilities
(classification, ``(n, classes)``), the positive class's probability (binary, ``(n,)``),
each label's probability (multilabel, ``(n, labels)``), predictions in the user's units
(regression, ``(n, targets)``).

A measure that the data cannot define (the recall of a class the set lacks, a ROC-AUC
without both classes) is None, with one warning naming why; never a perfect score.
"""

import logging
import warnings
from collections.abc import Sequence
from functools import cache

import numpy as np

from fedge.datafiles import MAX_LISTED

log = logging.getLogger("fedge")

# The measure a task shows beside the loss on the console and in the Python API's result.
HEADLINE = {"classification": "accuracy", "binary": "pr_auc", "multilabel": "micro_f1",
            "regression": "mae"}
# The scalar measures of each task (what --monitor may name, with val_ before it).
SCALARS = {
    "classification": ("accuracy", "balanced_accuracy", "macro_f1"),
    "binary": ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc",
               "pr_auc"),
    "multilabel": ("micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision"),
    "regression": ("mae", "rmse", "r2"),
}
LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
DEFAULT_THRESHOLD = 0.5


def higher_is_better(measure: str) -> bool:
    """Whether a larger value of ``measure`` (``val_`` and ``test_`` prefixes allowed) is
    better."""
    return measure.removeprefix("val_").removeprefix("test_") not in LOWER_IS_BETTER


def improves(measure: str, value: float, best: float | None, min_delta: float = 0.0,
             loss: float | None = None, best_loss: float | None = None) -> bool:
    """Whether ``value`` of ``measure`` improves on ``best`` by more than ``min_delta``, in
    the measure's direction; an equal value does when its ``loss`` is lower than
    ``best_loss``: a coarse measure (a PR-AUC on a few positives) reaches its best early
    and then ties, while the model still gets better."""
    if best is None:
        return True
    gain = value - best if higher_is_better(measure) else best - value
    if gain > min_delta:
        return True
    return (gain == 0 and loss is not None and best_loss is not None and loss < best_loss
            and measure.removeprefix("val_") != "loss")


def monitorable(task: str) -> tuple[str, ...]:
    """What ``--monitor`` may name for ``task``."""
    return ("val_loss", *(f"val_{name}" for name in SCALARS[task]))


@cache
def _warn_once(message: str) -> None:
    log.warning("warning: %s", message)


def lacking(task: str, y: np.ndarray, names: Sequence[str] | None, count: int) -> list[str]:
    """The ``count`` classes (multilabel: labels) that ``y`` has no sample (positive) of."""
    if task == "regression":
        return []
    y = np.asarray(y)
    if task == "multilabel":
        present = y.reshape(len(y), -1).any(axis=0) if len(y) else np.zeros(count, bool)
    else:
        present = np.isin(np.arange(count), y)
    return [name for name, here in zip(_named(names, count), present, strict=True)
            if not here]


def warn_lacking(where: str | None, task: str, y: np.ndarray,
                 names: Sequence[str] | None, count: int) -> None:
    """One warning, once, naming the classes (labels) the set ``where`` lacks: a run names
    them when it starts, and every evaluation on that set would otherwise repeat it."""
    if where is None:
        return
    missing = lacking(task, y, names, count)
    if not missing:
        return
    kind, kinds, sample = (("label", "labels", "positive sample") if task == "multilabel"
                           else ("class", "classes", "sample"))
    shown = ", ".join(map(repr, missing[:MAX_LISTED])) + (
        ", ..." if len(missing) > MAX_LISTED else "")
    listed = f"{kind} {shown}" if len(missing) == 1 else f"{len(missing)} {kinds}: {shown}"
    them = "it" if len(missing) == 1 else "them"
    _warn_once(f"{where} has no {sample} of {listed}; the measures that need {them} are null")


def measures(task: str, scores: np.ndarray, y: np.ndarray, *,
             threshold: Sequence[float] | None = None,
             names: Sequence[str] | None = None, where: str | None = "the data") -> dict:
    """Every measure of ``task``: the scalars of :data:`SCALARS` and, by task, per-class
    (per-label, per-target) tables and the confusion matrix. ``names`` names the classes,
    labels or targets (ids when None); ``where`` names the set for warnings (None: no
    warnings, for a client's small split, which may well lack a class)."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y)
    if len(y) == 0:
        return {name: None for name in SCALARS[task]}
    outputs = 2 if task == "binary" else scores.reshape(len(y), -1).shape[1]
    warn_lacking(where, task, y, names, outputs)
    if task == "classification":
        return _classification(scores, y.astype(np.int64), names)
    if task == "binary":
        cut = DEFAULT_THRESHOLD if threshold is None else float(threshold[0])
        return _binary(scores.reshape(-1), y.reshape(-1).astype(np.int64), cut, names)
    if task == "multilabel":
        return _multilabel(scores, y.astype(np.int64), threshold, names)
    return _regression(scores.reshape(len(y), -1), y.astype(np.float64).reshape(len(y), -1),
                       names)


def _named(names: Sequence[str] | None, count: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(count)]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values; None when one is undefined (a macro average over
    fewer classes than the task has would flatter the model)."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def _per_class(confusion: np.ndarray, names: list[str]) -> dict:
    table = {}
    for k, name in enumerate(names):
        true_positives = confusion[k, k]
        support = int(confusion[k].sum())
        precision = _ratio(true_positives, confusion[:, k].sum())
        recall = _ratio(true_positives, support)
        table[name] = {"precision": precision, "recall": recall,
                       "f1": _f1(precision if precision is not None else 0.0, recall),
                       "support": support}
    return table


def _classification(scores: np.ndarray, y: np.ndarray, names: Sequence[str] | None
                    ) -> dict:
    classes = scores.shape[1]
    predicted = scores.argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    per_class = _per_class(confusion, _named(names, classes))
    return {
        "accuracy": float(np.mean(predicted == y)),
        "balanced_accuracy": _mean([c["recall"] for c in per_class.values()]),
        "macro_f1": _mean([c["f1"] for c in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def _ranking(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """ROC-AUC and average precision (PR-AUC), or None where ``y`` lacks a class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        return None, None
    return float(roc_auc_score(y, scores)), float(average_precision_score(y, scores))


def _binary(probability: np.ndarray, y: np.ndarray, threshold: float,
            names: Sequence[str] | None) -> dict:
    negative, positive = _named(names, 2)
    predicted = (probability >= threshold).astype(np.int64)
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    per_class = _per_class(confusion, [negative, positive])
    roc_auc, pr_auc = _ranking(y, probability)
    return {
        "accuracy": float(np.mean(predicted == y)),
        "balanced_accuracy": _mean([c["recall"] for c in per_class.values()]),
        "precision": per_class[positive]["precision"],
        "recall": per_class[positive]["recall"],
        "f1": per_class[positive]["f1"],
        "roc_auc": roc_auc, "pr_auc": pr_auc, "threshold": threshold,
        "per_class": per_class, "confusion_matrix": confusion.tolist(),
    }


def _multilabel(probability: np.ndarray, y: np.ndarray, threshold: Sequence[float] | None,
                names: Sequence[str] | None) -> dict:
    labels = _named(names, y.shape[1])
    cuts = np.full(y.shape[1], DEFAULT_THRESHOLD) if threshold is None else np.asarray(
        threshold, dtype=np.float64)
    predicted = (probability >= cuts).astype(np.int64)
    true_positives = (predicted & y).sum(axis=0)
    per_label = {}
    for k, label in enumerate(labels):
        precision = _ratio(true_positives[k], predicted[:, k].sum())
        recall = _ratio(true_positives[k], y[:, k].sum())
        _, average_precision = _ranking(y[:, k], probability[:, k])
        per_label[label] = {"precision": precision, "recall": recall,
                            "f1": _f1(precision if precision is not None else 0.0, recall),
                            "average_precision": average_precision,
                            "support": int(y[:, k].sum()), "threshold": float(cuts[k])}
    micro_precision = _ratio(true_positives.sum(), predicted.sum())
    micro_recall = _ratio(true_positives.sum(), y.sum())
    return {
        "micro_f1": _f1(micro_precision if micro_precision is not None else 0.0, micro_recall),
        "macro_f1": _mean([p["f1"] for p in per_label.values()]),
        "subset_accuracy": float(np.mean((predicted == y).all(axis=1))),
        "mean_average_precision": _mean([p["average_precision"] for p in per_label.values()]),
        "per_label": per_label,
    }


def _regression(predicted: np.ndarray, y: np.ndarray, names: Sequence[str] | None) -> dict:
    error = predicted - y
    spread = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    r2 = [1 - float((e ** 2).sum()) / s if s > 0 else None for e, s in zip(error.T, spread,
                                                                           strict=True)]
    per_target = {name: {"mae": float(np.abs(error[:, k]).mean()),
                         "rmse": float(np.sqrt((error[:, k] ** 2).mean())), "r2": r2[k]}
                  for k, name in enumerate(_named(names, y.shape[1]))}
    result = {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
              "r2": _mean(r2)}
    return {**result, "per_target": per_target} if y.shape[1] > 1 else result


def choose_threshold(rule: str | None, probability: np.ndarray, y: np.ndarray
                     ) -> tuple[float, ...]:
    """One threshold per output (binary: one; multilabel: per label) by ``rule``: ``f1``
    (the best F1), ``recall:R`` (the highest threshold that still finds R of the
    positives), ``precision:P`` (the lowest whose precision reaches P), a number, or None
    (0.5). A label without positives keeps 0.5."""
    probability = np.asarray(probability, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y).reshape(len(y), -1).astype(np.int64)
    return tuple(_threshold(rule, probability[:, k], y[:, k]) for k in range(y.shape[1]))


def _threshold(rule: str | None, probability: np.ndarray, y: np.ndarray) -> float:
    if rule is None:
        return DEFAULT_THRESHOLD
    kind, _, target = rule.rpartition(":")
    if rule != "f1" and kind == "":
        return float(rule)
    if y.sum() == 0 or y.sum() == len(y):
        return DEFAULT_THRESHOLD
    from sklearn.metrics import precision_recall_curve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # precision of an empty prediction: handled below
        precision, recall, cuts = precision_recall_curve(y, probability)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    if rule == "f1":
        f1 = np.where(precision + recall > 0,
                      2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        return float(cuts[int(np.argmax(f1))])
    goal = float(target)
    if kind == "recall":
        meeting = np.flatnonzero(recall >= goal)
        return float(cuts[meeting[-1]]) if len(meeting) else float(cuts[0])
    meeting = np.flatnonzero(precision >= goal)
    return float(cuts[meeting[0]]) if len(meeting) else float(cuts[-1])


def headline(task: str, found: dict, prefix: str = "") -> str:
    """The task's headline measure as the console shows it: ``val_pr_auc 0.812``
    (classification's accuracy as ``val_acc``, as fedge always printed it)."""
    name = HEADLINE[task]
    value = found.get(name)
    shown = "  n/a" if value is None else f"{value:6.3f}"
    return f"{prefix}{'acc' if name == 'accuracy' else name} {shown}"


def test_headline(task: str, found: dict | None) -> str:
    """The run's result in a few words: ``test accuracy 0.941``, ``test pr_auc 0.812``."""
    name = HEADLINE[task]
    value = (found or {}).get(name)
    return f"test {name} " + ("n/a" if value is None else f"{value:.3f}")
