"""Deployment credentials: the operator's TLS certificates and a device's node keys."""

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedge.client.keys import make_node_keys
from fedge.errors import FedgeError
from fedge.server.certs import make_certificates

HOSTS = ["127.0.0.1", "localhost", "::1", "fedge.example.org"]
TIMEOUT = 10


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"), HOSTS)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_four_files_are_written_under_their_names(certs):
    assert {key: path.name for key, path in certs.items()} == {
        "ca_cert": "ca.pem", "ca_key": "ca.key",
        "server_cert": "server.pem", "server_key": "server.key"}
    assert len({path.parent for path in certs.values()}) == 1


def test_the_ca_is_a_self_signed_certificate_authority(certs):
    ca = load_cert(certs["ca_cert"])
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)


def test_the_ca_signs_the_server_certificate(certs):
    ca, server = load_cert(certs["ca_cert"]), load_cert(certs["server_cert"])
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           ec.ECDSA(server.signature_hash_algorithm))


def test_the_server_certificate_is_for_serving_not_signing(certs):
    server = load_cert(certs["server_cert"])
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_subject_alt_names_are_exactly_the_hosts_ips_as_addresses_names_as_dns(certs):
    names = load_cert(certs["server_cert"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "fedge.example.org"]
    assert len(names) == len(HOSTS)


def test_private_keys_are_p384_and_readable_only_by_their_owner(certs):
    for name in ("ca_key", "server_key"):
        assert mode(certs[name]) == 0o600, name
        key = serialization.load_pem_private_key(certs[name].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp384r1"


def test_each_certificate_holds_the_public_half_of_its_key(certs):
    for cert, key in (("ca_cert", "ca_key"), ("server_cert", "server_key")):
        private = serialization.load_pem_private_key(certs[key].read_bytes(), password=None)
        assert load_cert(certs[cert]).public_key() == private.public_key()


def test_existing_files_are_never_overwritten(tmp_path):
    make_certificates(tmp_path, ["localhost"])
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(FedgeError, match=r"ca\.pem.*ca\.key.*server\.pem.*server\.key"):
        make_certificates(tmp_path, ["localhost"])
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_one_existing_file_is_enough_to_refuse_and_nothing_else_is_written(tmp_path):
    (tmp_path / "server.key").write_bytes(b"someone's key")
    with pytest.raises(FedgeError, match=r"server\.key"):
        make_certificates(tmp_path, ["localhost"])
    assert [path.name for path in tmp_path.iterdir()] == ["server.key"]
    assert (tmp_path / "server.key").read_bytes() == b"someone's key"


@pytest.mark.parametrize("hosts, message", [
    ([], "at least one host"),
    (["localhost", "bad host"], "'bad host' is neither an IP address nor a DNS name"),
    (["-leading-hyphen"], "neither an IP address nor a DNS name"),
    (["1.2.3.999"], "'1.2.3.999' is neither an IP address nor a DNS name"),
    (["0.0.0.0"], "the address a server listens on, not one clients dial"),
])
def test_bad_hosts_are_refused_before_anything_is_written(tmp_path, hosts, message):
    out = tmp_path / "certs"
    with pytest.raises(FedgeError, match=message):
        make_certificates(out, hosts)
    assert not out.exists()


def test_out_dir_is_created_with_its_parents(tmp_path):
    paths = make_certificates(tmp_path / "a" / "b", ["localhost"])
    assert all(path.parent == tmp_path / "a" / "b" for path in paths.values())


def serve_one_handshake(cert: Path, key: Path) -> tuple[int, threading.Thread, list]:
    """A TLS server on 127.0.0.1 that completes (or fails) one handshake, then closes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    outcome: list = []

    def accept_once() -> None:
        with listener:
            connection, _ = listener.accept()
            connection.settimeout(TIMEOUT)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    outcome.append(tls.version())
            except (ssl.SSLError, OSError) as error:
                outcome.append(error)
            finally:
                connection.close()

    thread = threading.Thread(target=accept_once, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, outcome


def handshake(port: int, trusted_ca: Path) -> str | None:
    context = ssl.create_default_context(cafile=trusted_ca)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.version()


def test_a_client_trusting_only_the_ca_completes_a_real_tls_handshake(tmp_path):
    paths = make_certificates(tmp_path, ["127.0.0.1", "localhost"])
    port, server, outcome = serve_one_handshake(paths["server_cert"], paths["server_key"])
    assert handshake(port, paths["ca_cert"]) is not None
    server.join(TIMEOUT)
    assert not server.is_alive()
    assert isinstance(outcome[0], str), outcome


def test_a_client_trusting_another_ca_rejects_the_server(tmp_path):
    paths = make_certificates(tmp_path / "ours", ["127.0.0.1", "localhost"])
    other = make_certificates(tmp_path / "theirs", ["127.0.0.1", "localhost"])
    port, server, _ = serve_one_handshake(paths["server_cert"], paths["server_key"])
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, other["ca_cert"])
    server.join(TIMEOUT)
    assert not server.is_alive()


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_node_keys(tmp_path_factory.mktemp("keys"), name="device-7")


def test_node_keys_are_named_after_the_device(node_keys):
    assert [path.name for path in node_keys] == ["device-7.key", "device-7.pub"]


def test_the_node_private_key_is_an_unencrypted_openssh_p384_key_only_its_owner_reads(
        node_keys):
    private_path, _ = node_keys
    assert mode(private_path) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"


def test_the_node_public_key_is_one_openssh_line_matching_the_private_key(node_keys):
    private_path, public_path = node_keys
    line = public_path.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert line.count("\n") == 1 and line.endswith(" device-7\n")
    private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    assert serialization.load_ssh_public_key(line.encode()) == private.public_key()


def test_node_keys_sign_what_their_public_key_verifies(node_keys):
    private_path, public_path = node_keys
    private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    signature = private.sign(b"hello superlink", ec.ECDSA(hashes.SHA384()))
    public.verify(signature, b"hello superlink", ec.ECDSA(hashes.SHA384()))


def test_existing_node_keys_are_never_overwritten(tmp_path):
    private_path, public_path = make_node_keys(tmp_path)
    before = (private_path.read_bytes(), public_path.read_bytes())
    with pytest.raises(FedgeError, match=r"node\.key.*node\.pub"):
        make_node_keys(tmp_path)
    assert (private_path.read_bytes(), public_path.read_bytes()) == before


def test_a_lone_existing_public_key_also_blocks_a_new_pair(tmp_path):
    (tmp_path / "node.pub").write_text("ecdsa-sha2-nistp384 AAAA someone\n")
    with pytest.raises(FedgeError, match=r"node\.pub"):
        make_node_keys(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["node.pub"]


def test_a_validity_beyond_a_certificates_dates_is_refused(tmp_path):
    with pytest.raises(FedgeError, match="validity must be 1 to 36500 days"):
        make_certificates(tmp_path / "certs", ["localhost"], days=99_999_999)
    assert not (tmp_path / "certs").exists()


def test_certificates_are_never_left_half_written(tmp_path, monkeypatch):
    import fedge.files

    real, written = fedge.files.write_atomic, []

    def disk_full_after_two(path, data, mode=0o666):  # the disk fills up mid-way
        if len(written) == 2:
            raise FedgeError(f"cannot write {path}: No space left on device")
        real(path, data, mode)
        written.append(path)

    monkeypatch.setattr(fedge.files, "write_atomic", disk_full_after_two)
    with pytest.raises(FedgeError, match="No space left on device"):
        make_certificates(tmp_path / "certs", ["localhost"])
    assert list((tmp_path / "certs").iterdir()) == []
    monkeypatch.undo()
    assert len(make_certificates(tmp_path / "certs", ["localhost"])) == 4  # a retry works


@pytest.mark.parametrize("name", ["", "../escape", "a b", ".hidden", "n" * 65])
def test_a_key_name_must_be_a_plain_file_name(tmp_path, name):
    with pytest.raises(FedgeError, match="plain file name"):
        make_node_keys(tmp_path / "keys", name=name)
    assert not (tmp_path / "keys").exists()
