"""The server operator's TLS material: a private CA and the SuperLink's certificate.

SuperNodes trust only ``ca.pem`` (``--root-certificates``), so the CA key never leaves
the operator; the SuperLink serves ``server.pem``/``server.key`` and names ``ca.pem``
as ``--ssl-ca-certfile``.
"""

import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import FedgeError
from fedge.files import check_output_folder, refuse_overwrite, write_all_or_none

FILES = {"ca_cert": "ca.pem", "ca_key": "ca.key",
         "server_cert": "server.pem", "server_key": "server.key"}
MAX_DAYS = 36500  # a hundred years: beyond it a date no longer fits a certificate
# Certificates start slightly in the past so a device whose clock lags still accepts them.
CLOCK_SKEW = timedelta(minutes=5)
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

SubjectName = x509.IPAddress | x509.DNSName


def make_certificates(out_dir: Path, hosts: Sequence[str], days: int = 365) -> dict[str, Path]:
    """Write a fresh CA and a server certificate valid for every name in ``hosts``.

    Everything is checked before the first byte is written, so a refused call leaves
    ``out_dir`` exactly as it was. Keys are ECDSA P-384: the SuperLink's HTTPS server
    (OpenSSL) and gRPC (BoringSSL) both serve it, and every current TLS client accepts
    it, with far smaller keys and handshakes than RSA of equal strength.
    """
    names = subject_alt_names(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise FedgeError(f"certificate validity must be 1 to {MAX_DAYS} days, got {days}")
    paths = {key: out_dir / name for key, name in FILES.items()}
    check_output_folder(out_dir)
    refuse_overwrite(paths.values())
    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = self_signed_ca(ca_key, days)
    server_cert = server_certificate(server_key, names, ca_cert, ca_key, days)
    write_all_or_none({
        paths["ca_cert"]: (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        paths["ca_key"]: (pem_private_key(ca_key), 0o600),
        paths["server_cert"]: (server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        paths["server_key"]: (pem_private_key(server_key), 0o600),
    })
    return paths


def subject_alt_names(hosts: Sequence[str]) -> list[SubjectName]:
    """Each host as the entry a TLS client matches it against: IPs as IPAddress, names
    as DNSName (a client dialling an IP never matches a DNSName spelling it)."""
    if not hosts:
        raise FedgeError("give at least one host name or IP address the server is reached at")
    return list(dict.fromkeys(subject_alt_name(host) for host in hosts))


def subject_alt_name(host: str) -> SubjectName:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A DNS name has a non-numeric top label: "1.2.3.999" is a mistyped address.
        if (len(host) > 253 or not HOSTNAME.fullmatch(host)
                or host.rsplit(".", 1)[-1].isdigit()):
            raise FedgeError(f"{host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)
    if getattr(address, "scope_id", None):
        raise FedgeError(f"{host}: a certificate cannot name a scoped IPv6 address; give the "
                         "address without %ZONE")
    if address.is_unspecified:
        raise FedgeError(f"{host} is the address a server listens on, not one clients "
                         "dial; name the server's real address or host name")
    return x509.IPAddress(address)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: the SuperLink reads the key file without a passphrase."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def self_signed_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge CA")])
    public_key = key.public_key()
    return (
        validity(x509.CertificateBuilder(), days)
        .subject_name(name).issuer_name(name).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA384())
    )


def server_certificate(key: ec.EllipticCurvePrivateKey, names: list[SubjectName],
                       ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                       days: int) -> x509.Certificate:
    common_name = str(names[0].value)
    return (
        validity(x509.CertificateBuilder(), days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))


def key_usage(digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )


def read_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate in ``path``, or a clear error."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as error:
        raise FedgeError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise FedgeError(f"{path} is not a PEM certificate") from None


def check_server_certificates(folder: Path) -> None:
    """The files ``fedge certs`` wrote are all there, readable, current and of one
    server: what the SuperLink would otherwise find only after it has started."""
    missing = [name for name in ("ca.pem", "server.pem", "server.key")
               if not (folder / name).is_file()]
    if missing:
        raise FedgeError(f"{folder} lacks {', '.join(missing)}; make them with `fedge certs`")
    read_certificate(folder / "ca.pem")
    certificate = read_certificate(folder / "server.pem")
    key_path = folder / "server.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FedgeError(f"{key_path} is not an unencrypted PEM private key") from None
    if key.public_key() != certificate.public_key():
        raise FedgeError(f"{key_path} is not the key of {folder / 'server.pem'}")
    if certificate.not_valid_after_utc < datetime.now(UTC):
        raise FedgeError(f"{folder / 'server.pem'} expired on "
                         f"{certificate.not_valid_after_utc:%Y-%m-%d}; make new certificates "
                         "with `fedge certs`")


def check_certificate_names(folder: Path, host: str, why: str) -> None:
    """``server.pem`` in ``folder`` is valid for ``host``, an IP address or DNS name a TLS
    client dials (``why``: where that address comes from, for the error)."""
    path = folder / "server.pem"
    if not names_host(read_certificate(path), host):
        raise FedgeError(f"{path} is not valid for {host} ({why}): Flower's own processes "
                         "on this machine dial the server there; make certificates that name "
                         "it as well as the names clients dial (`fedge certs --host "
                         f"{host} --host ...`)")


def names_host(certificate: x509.Certificate, host: str) -> bool:
    """Whether a TLS client dialling ``host`` accepts ``certificate``'s names."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in names.value.get_values_for_type(x509.IPAddress)
    except ValueError:  # a DNS name
        return host.lower() in (name.lower() for name in
                                names.value.get_values_for_type(x509.DNSName))


def check_authorized_key(path: Path) -> None:
    """A device's public key as `fedge keys` writes it (OpenSSH, elliptic curve)."""
    if not path.is_file():
        raise FedgeError(f"authorized key {path} does not exist")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise FedgeError(f"authorized key {path} is not an OpenSSH public key; devices "
                         "make theirs with `fedge keys`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedgeError(f"authorized key {path} is not an elliptic-curve (ECDSA) key, the "
                         "only kind Flower accepts; devices make theirs with `fedge keys`")
