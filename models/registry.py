"""Models by name, each built from a :class:`ModelSpec` that travels with the weights."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from fedge.errors import FedgeError, validation_problems
from fedge.models.networks import MLP, ConvNet, InputScaling, Sensor1D, TinyText


class PretrainedSpec(BaseModel):
    """A pretrained Hugging Face encoder (:mod:`fedge.models.hf`): each process reads the
    base from its own copy of the folder, named by the spec's fingerprint; what the
    federation trains on top of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pad_id: int = Field(ge=0, description="the tokenizer's padding token")
    lora_rank: int | None = Field(None, ge=1, description="None: the whole model trains")
    lora_alpha: float | None = Field(None, gt=0)
    lora_targets: tuple[str, ...] | None = None


class ModelSpec(BaseModel):
    """Everything needed to rebuild a network, apart from its trained weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        min_length=1, description="shape of one sample, without batch")
    # Classes (classification, binary: 2), labels (multilabel) or targets (regression).
    num_classes: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    vocab_size: int | None = None
    input_dtype: Literal["float32", "int64"] = "float32"
    # Label names in class-id order (sorted, as the data files define them); None: ids.
    class_names: tuple[str, ...] | None = None
    # Columns of the run's CSV files that are no features (the label column, a
    # column:NAME partition's column): `fedge predict` skips them in those very files.
    non_feature_columns: tuple[str, ...] = ()
    # Your own model: a digest of its architecture (fedge.models.program.fingerprint),
    # and the model itself as a program archive; the archive travels beside the spec's
    # JSON, not in it.
    fingerprint: str | None = None
    program: bytes | None = Field(None, exclude=True, repr=False)
    # A pretrained model (name hf:FOLDER-NAME): fingerprint is its base's
    # (fedge.models.hf.base_fingerprint), and it takes token ids.
    pretrained: PretrainedSpec | None = None
    base_folder: str | None = Field(None, exclude=True, repr=False)  # this process's copy
    # What the network learns (fedge.models.tasks): binary has one output, the positive
    # class's logit (class_names: negative, positive); the loss's class weights (binary,
    # multilabel: of the positives); regression's targets in the server's validation
    # units (mean, std), and a decision threshold per output, chosen at the run's end.
    task: Literal["classification", "binary", "multilabel", "regression"] = "classification"
    loss: Literal["auto", "mse", "huber"] = "auto"
    class_weights: tuple[float, ...] | None = None
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None
    threshold: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _outputs_fit_the_task(self) -> "ModelSpec":
        if self.task in ("classification", "binary") and self.num_classes < 2:
            raise ValueError(f"a {self.task} task needs at least 2 classes")
        if self.task == "binary" and self.num_classes != 2:
            raise ValueError("a binary task has 2 classes: negative and positive")
        return self

    @property
    def outputs(self) -> int:
        """The network's output width: one logit per class, label or target; binary's one."""
        return 1 if self.task == "binary" else self.num_classes

    @property
    def builtin(self) -> bool:
        return self.name in MODELS

    @property
    def carries_program(self) -> bool:
        """Your own model: devices get it as a program."""
        return not self.builtin and self.pretrained is None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as error:
            raise FedgeError(f"invalid model spec: {validation_problems(error)}") from error
        except (ValueError, TypeError) as error:
            raise FedgeError(f"invalid model spec: {error}") from error


@dataclass(frozen=True)
class ModelEntry:
    """How to build one kind of network and what a sample must look like for it."""

    build: Callable[[ModelSpec], nn.Module]
    sample_layout: tuple[str, ...]
    input_dtype: Literal["float32", "int64"] = "float32"


def _scaling(spec: ModelSpec) -> InputScaling:
    """The spec's input scaling; the identity for a model that takes inputs as they are
    (``scale_inputs = false``)."""
    channels = spec.input_shape[0]
    return InputScaling(spec.input_mean or [0.0] * channels, spec.input_std or [1.0] * channels,
                        ndim=len(spec.input_shape) + 1)


MODELS: dict[str, ModelEntry] = {
    "cnn": ModelEntry(
        lambda s: ConvNet(_scaling(s), s.input_shape, s.outputs, s.dropout),
        ("channels", "height", "width"),
    ),
    "mlp": ModelEntry(
        lambda s: MLP(_scaling(s), s.input_shape, s.outputs, s.dropout),
        ("features",),
    ),
    "sensor1d": ModelEntry(
        lambda s: Sensor1D(_scaling(s), s.input_shape, s.outputs, s.dropout),
        ("channels", "time"),
    ),
    "tinytext": ModelEntry(
        lambda s: TinyText(s.input_shape, s.outputs, s.dropout, vocab_size=s.vocab_size or 2),
        ("tokens",),
        input_dtype="int64",
    ),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise FedgeError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def check_sample_shape(name: str, sample_shape: tuple[int, ...]) -> None:
    """Fail clearly when samples of ``sample_shape`` cannot be fed to built-in model
    ``name`` (your own model is tried on the samples themselves)."""
    if name not in MODELS:
        return
    layout = model_entry(name).sample_layout
    if len(sample_shape) != len(layout):
        raise FedgeError(
            f"model {name!r} expects samples shaped ({', '.join(layout)}), "
            f"but the data has samples of shape {tuple(sample_shape)}"
        )


def spec_from_data(name: str, x: np.ndarray, num_classes: int, dropout: float,
                   vocab_size: int | None = None,
                   class_names: tuple[str, ...] | None = None,
                   scale_inputs: bool | None = None,
                   non_feature_columns: tuple[str, ...] = (),
                   task: str = "classification") -> ModelSpec:
    """A spec for model ``name`` whose input scaling is fitted on reference data ``x``.

    Mean and standard deviation are taken per channel (or per feature): axis 1 of ``x``.
    Built-in models scale their inputs unless ``scale_inputs`` is False; your own model
    only if it is True. Integer samples are token ids, never scaled.
    """
    builtin = name in MODELS
    check_sample_shape(name, x.shape[1:])
    dtype = model_entry(name).input_dtype if builtin else (
        "int64" if np.issubdtype(x.dtype, np.integer) else "float32")
    common = {"name": name, "input_shape": tuple(int(d) for d in x.shape[1:]),
              "num_classes": num_classes, "dropout": dropout, "class_names": class_names,
              "input_dtype": dtype, "non_feature_columns": non_feature_columns, "task": task}
    if dtype == "int64":
        return ModelSpec(**common, vocab_size=vocab_size or int(x.max()) + 1)
    if not (scale_inputs if scale_inputs is not None else builtin):
        return ModelSpec(**common)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return ModelSpec(**common, input_mean=mean.tolist(), input_std=std.tolist())


def check_labelled_samples(spec: ModelSpec, x: np.ndarray, y: np.ndarray, source: object) -> None:
    """Labelled samples from ``source`` the model can be evaluated on: labels among its
    classes (or one per label or target), and token ids within its vocabulary."""
    if spec.task in ("multilabel", "regression"):
        width = y.shape[1] if y.ndim == 2 else 1
        if width != spec.num_classes:
            what = "labels" if spec.task == "multilabel" else "targets"
            raise FedgeError(f"{source} has {width} {what} per sample, but the model has "
                             f"{spec.num_classes}")
    elif len(y) and int(y.max()) >= spec.num_classes:
        raise FedgeError(f"{source} has label {int(y.max())}, but the model has "
                         f"{spec.num_classes} classes (0..{spec.num_classes - 1})")
    if spec.builtin and model_entry(spec.name).input_dtype == "int64":
        check_token_ids(x, spec.vocab_size or 2, source)


def check_token_ids(x: np.ndarray, vocab_size: int, source: object) -> None:
    """Token ids must be whole numbers in ``0..vocab_size - 1``."""
    valid = np.isfinite(x) & (x >= 0) & (x < vocab_size) & (np.floor(x) == x)
    if not valid.all():
        raise FedgeError(f"{source} holds token id {x[~valid].flat[0]:g}, but the model "
                         f"takes whole token ids 0..{vocab_size - 1}")


def build_model(spec: ModelSpec) -> nn.Module:
    """The network ``spec`` describes, with fresh weights: a built-in network, your own
    model's program (:class:`~fedge.models.program.ProgramModel`), which needs no source
    code, or a pretrained model over this process's copy of its base
    (:func:`~fedge.models.hf.build_classifier`)."""
    if spec.pretrained is not None:
        from fedge.models.hf import build_classifier

        return build_classifier(spec)
    if not spec.builtin:
        from fedge.models.program import ProgramModel

        if spec.program is None:
            raise FedgeError(f"model {spec.name} comes without its program")
        return ProgramModel(spec.program)  # type: ignore[return-value]  # runs like one
    entry = model_entry(spec.name)
    try:
        return entry.build(spec)
    except (ValueError, TypeError, RuntimeError, AssertionError, IndexError) as error:
        raise FedgeError(f"a {spec.name!r} model cannot be built from its spec "
                         f"(input shape {spec.input_shape}): {str(error) or type(error).__name__}"
                         ) from error


def as_input_tensor(spec: ModelSpec, x: np.ndarray) -> torch.Tensor:
    """Raw samples as the tensor type the model takes."""
    dtype = model_entry(spec.name).input_dtype if spec.builtin else spec.input_dtype
    return torch.as_tensor(x, dtype=getattr(torch, dtype))
