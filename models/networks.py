"""Small networks for edge devices.

Every network starts with :class:`InputScaling`, so fixed input scaling lives inside
the model and an exported ONNX graph can be fed raw device data.
"""

from collections.abc import Sequence

import torch
from torch import nn


class InputScaling(nn.Module):
    """``(x - mean) / std`` along the feature or channel axis (axis 1).

    The constants are non-persistent buffers: they are part of the model's definition
    (its spec), not of the weights exchanged between clients and server.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], ndim: int) -> None:
        super().__init__()
        shape = (1, len(mean)) + (1,) * (ndim - 2)
        self.register_buffer("mean", torch.tensor(mean).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvNet(nn.Module):
    """Two 3×3 convolutions and a small classifier head, for 1-channel images."""

    def __init__(self, scaling: InputScaling, in_shape: Sequence[int], num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        channels, height, width = in_shape
        self.scaling = scaling
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(32 * (height // 2) * (width // 2), 64), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.scaling(x)))


class MLP(nn.Module):
    """Two hidden layers for tabular features."""

    def __init__(self, scaling: InputScaling, in_shape: Sequence[int], num_classes: int,
                 dropout: float, hidden: int = 64) -> None:
        super().__init__()
        (features,) = in_shape
        self.scaling = scaling
        self.layers = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.scaling(x))


class Sensor1D(nn.Module):
    """1-D convolutions over multichannel sensor windows ``(channels, time)``.

    Global average pooling over time makes the head independent of the window length.
    """

    def __init__(self, scaling: InputScaling, in_shape: Sequence[int], num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        channels, _ = in_shape
        self.scaling = scaling
        self.features = nn.Sequential(
            nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.scaling(x)))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention block, written out so that it exports cleanly to ONNX."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5 + key_bias
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.dropout(self.proj(attended))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TinyText(nn.Module):
    """A small Transformer encoder classifier over token ids (0 is padding)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, dropout: float,
                 vocab_size: int, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        (length,) = in_shape
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(1, length, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = (tokens != 0).unsqueeze(-1).float()
        # A large negative bias (not -inf) keeps all-padding rows finite.
        key_bias = (1.0 - keep.transpose(1, 2)).unsqueeze(1) * -1e9
        x = self.tokens(tokens) + self.positions
        for block in self.blocks:
            x = block(x, key_bias)
        pooled = (self.norm(x) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)
