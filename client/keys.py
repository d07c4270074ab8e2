"""A device's node-authentication key pair for a SuperLink run with --enable-supernode-auth.

The private key stays on the device (``flower-supernode --auth-supernode-private-key``);
the operator registers the public key (``flwr supernode register KEY.pub ...``).
"""

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.errors import FedgeError
from fedge.files import refuse_overwrite, write_atomic

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def make_node_keys(out_dir: Path, name: str = "node") -> tuple[Path, Path]:
    """Write ``<name>.key`` (0600) and ``<name>.pub``; return (private, public) paths.

    Flower accepts only elliptic-curve keys on a NIST curve in OpenSSH format; P-384 is
    the curve Flower generates its own keys on (``ssh-keygen -t ecdsa -b 384``).
    """
    if not KEY_NAME.fullmatch(name):
        raise FedgeError(f"key name {name!r} must be a plain file name "
                         "(letters, digits, '.', '_', '-')")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    refuse_overwrite((private_path, public_path))
    key = ec.generate_private_key(ec.SECP384R1())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), mode=0o600)
    write_atomic(public_path, public_key_line(key, comment=name))
    return private_path, public_path


def public_key_line(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """One ``authorized_keys``-style line; the comment tells the operator whose key it is."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()
