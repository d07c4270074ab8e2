"""Pretrained Hugging Face models from a local folder (``--model hf:PATH``): a text
classifier over the folder's encoder, with low-rank adapters (LoRA) when asked, and the
folder's tokenizer.

The network is ``encoder → mean of the token states (padding left out) → dropout → head``:
``head`` is a fresh ``Linear`` with one output per class, label or target. With LoRA
(Hu et al. 2021, through ``peft``) every targeted weight ``W`` of the frozen encoder
becomes ``W + (α / r) · B A`` with ``A`` of shape (r, in) and ``B`` of shape (out, r),
``B`` starting at zero; only the adapters and the head are the model's *state*: its
``state_dict`` holds them alone, so they alone are trained, sent and aggregated. The frozen
base is part of the model's definition, named by :func:`base_fingerprint`; every process
reads it from its own copy of the folder.

Only this module imports ``transformers``, ``peft`` and ``tokenizers`` (``fedge[text]``),
and never lets them reach the network: the folder is read with ``local_files_only``.
"""

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedge.errors import FedgeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from fedge.config import ModelSettings
    from fedge.models.registry import ModelSpec

PREFIX = "hf:"
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
MAX_LENGTH = 128  # tokens, at most, when --max-length is not given
EXTRA = "pip install 'fedge[text]'"


def is_pretrained(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def model_folder(model: str) -> Path:
    """The folder of ``hf:PATH``, checked: fedge never downloads, so it must hold the
    model's configuration, its weights as safetensors and its tokenizer."""
    folder = Path(model.removeprefix(PREFIX)).expanduser()
    offline = ("fedge reads models only from a local folder and never downloads one "
               "(HF_HUB_OFFLINE=1); give the path of a Hugging Face model folder with "
               f"{CONFIG}, {WEIGHTS} and {TOKENIZER}")
    if not folder.is_dir():
        raise FedgeError(f"no Hugging Face model folder at {folder}: {offline}")
    missing = [name for name in (CONFIG, WEIGHTS, TOKENIZER) if not (folder / name).is_file()]
    if missing:
        raise FedgeError(f"the model folder {folder} lacks {', '.join(missing)}: {offline}")
    return folder.resolve()


def check_pretrained_settings(settings: "ModelSettings", edge_programs: bool = False) -> None:
    """The model settings that cannot go together, said before anything starts: LoRA
    without a pretrained model, its scale or targets without a rank, a folder fedge cannot
    read, programs for devices without Python."""
    given = [option for option, value in (("--lora", settings.lora),
                                          ("--lora-alpha", settings.lora_alpha),
                                          ("--lora-targets", settings.lora_targets or None))
             if value is not None]
    if not is_pretrained(settings.name):
        if given:
            raise FedgeError(f"{given[0]} adapts a pretrained Hugging Face model: give "
                             "--model hf:FOLDER")
        return
    if settings.lora is None and given:
        raise FedgeError(f"{given[0]} sets up LoRA adapters: give their rank with --lora too")
    model_folder(settings.name)
    if edge_programs:
        raise FedgeError("--edge-programs: devices without Python cannot train a Hugging Face "
                         "model; ExecuTorch programs are made for fedge's networks and your "
                         "own (FILE.py:NAME). Its ONNX model runs on any device with "
                         "onnxruntime")


def pretrained_folder(model: str | None) -> Path | None:
    """The folder of a pretrained model ``hf:PATH``; None for any other model."""
    return model_folder(model) if is_pretrained(model) else None


def base_fingerprint(folder: Path) -> str:
    """A digest of the folder's configuration, weights and tokenizer: the base model
    every member of a federation must hold."""
    files = [folder / name for name in (CONFIG, WEIGHTS, TOKENIZER)]
    return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _quiet_imports() -> None:
    """transformers' progress bars and the optional kernels peft probes are no news to a
    fedge user; offline, always."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _text_library(name: str) -> None:
    raise FedgeError(f"Hugging Face models need {name}: {EXTRA}")


def load_tokenizer(folder: Path, max_length: int | None = None) -> "Tokenizer":
    """The folder's tokenizer; with ``max_length``, it truncates and pads every text to
    exactly that many tokens."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        _text_library("the tokenizers library")
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as error:  # the Rust library raises a plain Exception
        raise FedgeError(f"{folder / TOKENIZER} is not a readable tokenizer: {error}"
                         ) from error
    if max_length is not None:
        fixed_length(tokenizer, max_length)
    return tokenizer


def fixed_length(tokenizer: "Tokenizer", max_length: int) -> "Tokenizer":
    """``tokenizer``, truncating longer texts (their end is cut) and padding shorter ones
    with its padding token to ``max_length`` tokens."""
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id(tokenizer),
                             pad_token=tokenizer.id_to_token(pad_id(tokenizer)) or "[PAD]")
    return tokenizer


def pad_id(tokenizer: "Tokenizer") -> int:
    """The padding token's id: the tokenizer's own, else ``[PAD]``'s or ``<pad>``'s, else 0."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        if (token_id := tokenizer.token_to_id(token)) is not None:
            return int(token_id)
    return 0


def encode(tokenizer: "Tokenizer", texts: Sequence[str]) -> np.ndarray:
    """Token ids of ``texts`` as one int64 array (texts, max_length)."""
    encodings = tokenizer.encode_batch([str(text) for text in texts])
    return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)


def fitting_length(tokenizer: "Tokenizer", texts: Sequence[str], limit: int) -> int:
    """The fewest tokens that hold the longest of ``texts`` (special tokens included),
    rounded up to a multiple of 8, at most ``limit``."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    longest = max((len(e.ids) for e in tokenizer.encode_batch([str(t) for t in texts])),
                  default=1)
    return min(limit, -(-longest // 8) * 8)


def position_limit(folder: Path) -> int:
    """The most tokens the model takes (its position embeddings)."""
    import json

    config = json.loads((folder / CONFIG).read_text())
    return int(config.get("max_position_embeddings") or MAX_LENGTH)


def load_encoder(folder: Path) -> nn.Module:
    """The folder's pretrained encoder (``AutoModel``), from the folder alone."""
    _quiet_imports()
    try:
        import transformers
    except ImportError:
        _text_library("transformers")
    transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise FedgeError(f"{folder} holds no model transformers can load: "
                         f"{str(error).splitlines()[0]}") from error


def with_lora(encoder: nn.Module, rank: int, alpha: float,
              targets: Sequence[str] | None) -> nn.Module:
    """``encoder`` with LoRA adapters of ``rank`` on the ``targets`` modules (None: peft's
    choice for the architecture, e.g. BERT's query and value projections); the base's
    weights frozen."""
    _quiet_imports()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        _text_library("peft")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets) if targets else None)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(encoder, config)
    except ValueError as error:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in encoder.named_modules()
                        if isinstance(m, nn.Linear)})
        raise FedgeError(f"LoRA cannot adapt this model: {str(error).splitlines()[0]} "
                         f"(its linear layers are named: {', '.join(names)})") from error


class TextClassifier(nn.Module):
    """Token ids (batch, length) → one output per class, label or target.

    Token ``pad_id`` is padding: it is masked out of attention and pooling. With
    ``state_only_trainable`` (LoRA), the module's state is its trainable parameters (the
    adapters and the head); the frozen base stays out of ``state_dict`` and is never
    expected by ``load_state_dict``.
    """

    def __init__(self, encoder: nn.Module, outputs: int, dropout: float, pad_id: int,
                 state_only_trainable: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(_hidden_size(encoder), outputs)
        self.pad_id = pad_id
        if state_only_trainable:
            self.state_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)
            self.register_state_dict_post_hook(_only_state)
            self.register_load_state_dict_post_hook(_base_not_missing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != self.pad_id
        states = self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        keep = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def merged(self) -> "TextClassifier":
        """This classifier with its adapters added into the base weights: a plain encoder
        for export, nothing of peft left."""
        encoder = self.encoder
        if hasattr(encoder, "merge_and_unload"):
            import copy

            encoder = copy.deepcopy(encoder).merge_and_unload()
        plain = TextClassifier(encoder, self.head.out_features, self.dropout.p, self.pad_id)
        plain.head.load_state_dict(self.head.state_dict())
        return plain.train(self.training)


def _hidden_size(encoder: nn.Module) -> int:
    config = encoder.config
    size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not size:
        raise FedgeError(f"cannot tell the width of a {type(encoder).__name__}'s states")
    return int(size)


def _only_state(module: TextClassifier, state: dict, prefix: str, _metadata: object) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        if key[len(prefix):] not in module.state_names:
            del state[key]


def _base_not_missing(module: TextClassifier, incompatible: object) -> None:
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [key for key in missing if key in module.state_names]


@lru_cache(maxsize=2)
def _pretrained_encoder(folder: Path) -> nn.Module:
    return load_encoder(folder)


def build_classifier(spec: "ModelSpec") -> TextClassifier:
    """The classifier ``spec`` describes over this process's copy of its base
    (``spec.base_folder``), which must be the federation's (the same fingerprint);
    adapters and head freshly initialized."""
    import copy

    pretrained = spec.pretrained
    assert pretrained is not None
    if spec.base_folder is None:
        raise FedgeError(f"model {spec.name} is a pretrained Hugging Face model: this "
                         f"process needs its own copy of the folder (--model hf:PATH)")
    folder = Path(spec.base_folder)
    found = base_fingerprint(folder)
    if found != spec.fingerprint:
        raise FedgeError(f"the base model at {folder} (fingerprint {found}) is not the "
                         f"federation's {spec.name} (fingerprint {spec.fingerprint}): "
                         "another model, version or tokenizer")
    encoder = copy.deepcopy(_pretrained_encoder(folder))  # read once per process
    if pretrained.lora_rank is not None:
        encoder = with_lora(encoder, pretrained.lora_rank,
                            pretrained.lora_alpha or 2.0 * pretrained.lora_rank,
                            pretrained.lora_targets)
    return TextClassifier(encoder, spec.outputs, spec.dropout, pretrained.pad_id,
                          state_only_trainable=pretrained.lora_rank is not None)


def token_ids(parts: Sequence[np.ndarray], folder: Path, max_length: int | None
              ) -> list[np.ndarray]:
    """Texts from several sources as token ids of one length (int64, (texts, length)):
    ``max_length``, or by default the one that holds the longest text of them all
    (:func:`fitting_length`, at most :data:`MAX_LENGTH`), within the model's positions."""
    tokenizer = load_tokenizer(folder)
    limit = position_limit(folder)
    if max_length is not None and max_length > limit:
        raise FedgeError(f"--max-length {max_length} is more than the {limit} tokens the "
                         f"model at {folder} takes")
    length = max_length or fitting_length(
        tokenizer, [text for part in parts for text in part], min(MAX_LENGTH, limit))
    fixed_length(tokenizer, length)
    return [encode(tokenizer, part) for part in parts]


def pretrained_spec(spec: "ModelSpec", settings: "ModelSettings") -> "ModelSpec":
    """``spec`` (fitted to the server's token ids) as the pretrained model ``settings``
    names, with the LoRA settings; named by its folder's name, its base by fingerprint."""
    from fedge.models.registry import PretrainedSpec

    assert settings.name is not None
    folder = model_folder(settings.name)
    tokenizer = load_tokenizer(folder)
    rank = settings.lora
    return spec.model_copy(update={
        "name": PREFIX + folder.name, "fingerprint": base_fingerprint(folder),
        "vocab_size": tokenizer.get_vocab_size(), "base_folder": str(folder),
        "pretrained": PretrainedSpec(
            pad_id=pad_id(tokenizer), lora_rank=rank,
            lora_alpha=None if rank is None else settings.lora_alpha or 2.0 * rank,
            lora_targets=tuple(settings.lora_targets) or None if rank else None)})
