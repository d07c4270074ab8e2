"""Fine-tuning vs training from scratch, through the Python API, on real digits.

Pretrains a small CNN with BatchNorm (``MODEL``, written to a temporary ``my_model.py``)
centrally on the digits 0–4 among the clients' samples (never the server's validation or
test samples), then federates it over all ten digits in the same rounds three ways:
from scratch, from the pretrained weights with a fresh head (``--init``, ``--reset
'head.*'``), and the same with the features frozen (``--freeze 'features.*'``). Prints
each run's round-0 and final test accuracy and the bytes a client sent per round.

    python benchmarks/fine_tuning.py [--rounds 2] [--clients 5] [--lr 0.001] [--out DIR]

With ``--out`` the model file, the pretrained weights and the three run folders
(``scratch``, ``fine-tuned``, ``frozen``) stay in DIR (tests/test_fine_tuning.py reads
them).
"""

import argparse
import tempfile
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

import fedge
from fedge.models.source import instantiate, resolve_factory
from fedge.simulations.datasets import load_dataset, split_federated

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(32 * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))
'''


def pretrain(model_file: Path, out: Path, classes: int = 5, epochs: int = 5) -> None:
    torch.manual_seed(0)  # the same pretrained weights in every run, initialization too
    origin, factory = resolve_factory(f"{model_file}:Net")
    model = instantiate(origin, factory, (1, 8, 8), classes, 0.1)
    x, y = split_federated(load_dataset("digits"), seed=0).clients
    keep = y < classes
    inputs, labels = torch.as_tensor(x[keep]), torch.as_tensor(y[keep])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(32):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(model.state_dict(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--out", type=Path, help="keep everything in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = args.out or Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        model_file = root / "my_model.py"
        model_file.write_text(textwrap.dedent(MODEL))
        pretrain(model_file, root / "pretrained.pt")
        fine_tune = {"init": str(root / "pretrained.pt"), "reset": ["head.*"]}
        variants = {"scratch": ("from scratch", {}),
                    "fine-tuned": ("--init, --reset 'head.*'", fine_tune),
                    "frozen": ("... and --freeze 'features.*'",
                               {**fine_tune, "freeze": ["features.*"]})}
        print(f"digits, {args.clients} clients (iid), {args.rounds} rounds × 1 local epoch, "
              f"lr {args.lr}")
        print(f"{'run':32} {'round 0 val acc':>16} {'test acc':>9} {'bytes/client':>13}")
        for folder_name, (name, options) in variants.items():
            result = fedge.simulate(
                model=f"{model_file}:Net", rounds=args.rounds, clients=args.clients,
                local_epochs=1, partition="iid", lr=args.lr, out=root / folder_name,
                **options)
            sent = result.rounds[-1]["bytes_per_client"]
            print(f"{name:32} {result.initial['val_accuracy']:16.3f} "
                  f"{result.test_accuracy:9.3f} {sent:13,.0f}", flush=True)


if __name__ == "__main__":
    main()
