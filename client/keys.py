"""A device's node-authentication key pair for a SuperLink run with --enable-supernode-auth,
and the checks of the TLS material a device is given.

The private key stays on the device (``flower-supernode --auth-supernode-private-key``);
the operator registers the public key (``flwr supernode register KEY.pub ...``).
"""

import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.errors import FedgeError
from fedge.files import check_output_folder, refuse_overwrite, write_all_or_none

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def make_node_keys(out_dir: Path, name: str = "node") -> tuple[Path, Path]:
    """Write ``<name>.key`` (0600) and ``<name>.pub``; return (private, public) paths.

    Flower accepts only elliptic-curve keys on a NIST curve in OpenSSH format; P-384 is
    the curve Flower generates its own keys on (``ssh-keygen -t ecdsa -b 384``).
    """
    if not KEY_NAME.fullmatch(name):
        raise FedgeError(f"key name {name!r} must be a plain file name of at most 64 "
                         "characters (letters, digits, '.', '_', '-')")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    check_output_folder(out_dir)
    refuse_overwrite((private_path, public_path))
    key = ec.generate_private_key(ec.SECP384R1())
    write_all_or_none({
        private_path: (key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), 0o600),
        public_path: (public_key_line(key, comment=name), 0o644),
    })
    return private_path, public_path


def public_key_line(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """One ``authorized_keys``-style line; the comment tells the operator whose key it is."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def check_private_key(path: Path) -> None:
    """This device's key as `fedge keys` writes it, or a clear error."""
    if not path.is_file():
        raise FedgeError(f"private key {path} does not exist")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedgeError(f"{path} is not an unencrypted OpenSSH private key; make one with "
                         "`fedge keys`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedgeError(f"{path} is not an elliptic-curve (ECDSA) key, the only kind Flower "
                         "accepts; make one with `fedge keys`")


def check_ca_certificate(path: Path) -> None:
    """The server's CA certificate (``ca.pem``), or a clear error."""
    if not path.is_file():
        raise FedgeError(f"CA certificate {path} does not exist")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise FedgeError(f"{path} is not a PEM certificate; give the server's ca.pem") from None
