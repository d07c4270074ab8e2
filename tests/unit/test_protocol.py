"""One protocol: every key that server, clients and gateways exchange is spelt once, in
fedge.protocol, which both sides import (they never import each other)."""

import ast
import re
from pathlib import Path

import fedge
from fedge import protocol
from fedge.config import TrainingSettings

ROOT = Path(fedge.__file__).resolve().parents[1]
SIDES = ("server", "client", "simulations", "models", "fedge")
# Keys spelt as only a message spells them (a hyphen or a dot): a literal of one of these
# anywhere but fedge/protocol.py is a second definition.
# The training section's settings travel under keys made from their names.
TRAINING_KEYS = {protocol.training_key(name) for name in TrainingSettings.model_fields}
MESSAGE_KEYS = {value for name, value in vars(protocol).items()
                if name.isupper() and isinstance(value, str)
                and ("-" in value or "." in value)} | {k for k in TRAINING_KEYS if "-" in k}


def literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_message_keys_are_spelt_only_in_the_protocol_module():
    assert {"model-spec", "local-epochs", "num-examples", "query.run_finished"} <= MESSAGE_KEYS
    spelt_elsewhere = {
        str(path.relative_to(ROOT)): sorted(literals(path) & MESSAGE_KEYS)
        for side in SIDES for path in (ROOT / side).rglob("*.py")
        if path != ROOT / "fedge" / "protocol.py" and literals(path) & MESSAGE_KEYS}
    assert spelt_elsewhere == {}


def test_no_two_keys_share_a_spelling():
    keys = [value for name, value in vars(protocol).items()
            if name.isupper() and isinstance(value, str)]
    assert len(keys) == len(set(keys))



def test_the_device_protocol_document_names_the_keys_the_gateway_sends():
    text = (ROOT / "client" / "device" / "PROTOCOL.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([\w-]+)` \|", text, re.M))
    assert rows == protocol.DEVICE_TRAINING
    assert set(protocol.DEVICE_TRAINING.values()) <= TRAINING_KEYS | {
        protocol.PROXIMAL_MU, protocol.SEED}
