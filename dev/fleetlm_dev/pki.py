"""A throw-away PKI for the local control plane, the way controller-runtime's envtest makes one.

One CA signs the apiserver's serving certificate and the client certificates; a separate key pair
signs service-account tokens. ECDSA P-256 keys, valid for a week: enough for any test run, short
enough that a leaked directory is worthless.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)
# 10.0.0.1 is the first address of the apiserver's --service-cluster-ip-range (the in-cluster
# `kubernetes` Service); keeping it in the SANs lets in-cluster style clients verify the server.
SERVING_IPS = ("127.0.0.1", "10.0.0.1")
SERVING_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")


@dataclasses.dataclass(frozen=True, slots=True)
class Pki:
    directory: pathlib.Path

    @property
    def ca_cert(self) -> pathlib.Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> pathlib.Path:
        return self.directory / "ca.key"

    @property
    def serving_cert(self) -> pathlib.Path:
        return self.directory / "apiserver.crt"  # the name --cert-dir looks for

    @property
    def serving_key(self) -> pathlib.Path:
        return self.directory / "apiserver.key"

    @property
    def admin_cert(self) -> pathlib.Path:
        return self.directory / "admin.crt"

    @property
    def admin_key(self) -> pathlib.Path:
        return self.directory / "admin.key"

    @property
    def sa_key(self) -> pathlib.Path:
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> pathlib.Path:
        return self.directory / "sa.pub"


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _sign(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    is_ca: bool,
    usage: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.datetime.now(tz=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(ca_key, hashes.SHA256())


def create(directory: pathlib.Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fleetlm-test-ca")
    ca = _sign(
        subject=ca_name, public_key=ca_key.public_key(), ca_name=ca_name, ca_key=ca_key, is_ca=True, usage=[], sans=[]
    )
    _write_key(pki.ca_key, ca_key)
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    serving_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVING_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS]
    serving = _sign(
        subject=_name("localhost"),
        public_key=serving_key.public_key(),
        ca_name=ca_name,
        ca_key=ca_key,
        is_ca=False,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=sans,
    )
    _write_key(pki.serving_key, serving_key)
    pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))

    issue_client_cert(pki, user="admin", groups=("system:masters",), stem="admin", ca_key=ca_key, ca_name=ca_name)

    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki


def issue_client_cert(
    pki: Pki,
    *,
    user: str,
    groups: tuple[str, ...] = (),
    stem: str | None = None,
    ca_key: ec.EllipticCurvePrivateKey | None = None,
    ca_name: x509.Name | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """A client certificate for `user` in `groups` (x509 O= fields), signed by the test CA."""
    if ca_key is None:
        loaded = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    if ca_name is None:
        ca_name = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    stem = stem or user.replace(":", "_")
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    cert = _sign(
        subject=x509.Name(attributes),
        public_key=key.public_key(),
        ca_name=ca_name,
        ca_key=ca_key,
        is_ca=False,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[],
    )
    cert_path, key_path = pki.directory / f"{stem}.crt", pki.directory / f"{stem}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
