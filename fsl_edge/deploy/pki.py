"""The broker's certificate authority, server and client certificates, made with `cryptography`.

The CA is made once per namespace and kept (Secret fsl-broker-ca): every site bundle trusts it,
so regenerating it would re-provision every site. The server certificate is re-issued from the
same CA when the names sites use change or it nears expiry; sites notice nothing. With mutual
TLS (`client_certificates` in the deployment config) the same CA issues each client's
certificate: the coordinator's at deploy, a site's at enroll.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fsl_edge.errors import ConfigError

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
"""A server certificate this close to expiry is re-issued by the next deploy."""


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8) private key."""

    cert: bytes
    key: bytes


def broker_names(namespace: str, service: str, external_host: str | None) -> list[str]:
    """Every name a client may use for the broker: the Service's in-cluster names, and the host."""
    names = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
             f"{service}.{namespace}.svc.cluster.local"]
    return names + ([external_host] if external_host else [])


def new_ca(namespace: str) -> KeyPair:
    """A self-signed CA (ECDSA P-256) for one fsl-edge namespace."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fsl-edge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"fsl-edge broker CA ({namespace})")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clock skew
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(_cert_pem(cert), _key_pem(key))


def issue_server(ca: KeyPair, names: list[str]) -> KeyPair:
    """A server certificate for `names` (DNS names or IP addresses), signed by `ca`."""
    return _issue(ca, names[0], ExtendedKeyUsageOID.SERVER_AUTH, SERVER_DAYS,
                  x509.SubjectAlternativeName([_general_name(n) for n in names]))


def issue_client(ca: KeyPair, name: str) -> KeyPair:
    """A client certificate for node `name` (its CN), signed by `ca`: what mTLS asks of a client
    besides its password. Mosquitto checks only that it chains to the CA; the password still
    names the node, so a revoked node's certificate alone gets it nowhere."""
    return _issue(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, CLIENT_DAYS)


def _issue(ca: KeyPair, common_name: str, usage: x509.ObjectIdentifier, days: int,
           san: x509.SubjectAlternativeName | None = None) -> KeyPair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days)))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return KeyPair(_cert_pem(cert), _key_pem(key))


def check_ca_pair(ca: KeyPair, where: str) -> None:
    """ConfigError unless `ca` is a CA certificate with its own private key (before signing)."""
    try:
        cert = x509.load_pem_x509_certificate(ca.cert)
        key = serialization.load_pem_private_key(ca.key, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} is not a PEM certificate and unencrypted PEM key: {e}") from e
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ConfigError(f"{where}: the key is not the certificate's")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{where}: the certificate is not a CA (no basicConstraints CA:TRUE)")


def needs_reissue(cert_pem: bytes, ca_pem: bytes, names: list[str]) -> str | None:
    """Why the server certificate must be re-issued (names missing, expiring, another CA), or None."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    if cert.issuer != ca.subject:
        return "it was not issued by the broker CA"
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return "its signature does not verify against the broker CA"
    missing = set(names) - set(cert_names(cert_pem))
    if missing:
        return f"it does not name {', '.join(sorted(missing))}"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def cert_names(cert_pem: bytes) -> list[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
