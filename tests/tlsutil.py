"""
A throwaway certificate authority for tests, so TLS can be exercised against real certificates
(chains, hostnames, expiry) without shipping any key material in the repository.

    ca = make_ca(self.mktemp())
    cert_path, key_path = ca.issue("mx.example.test", self.mktemp())
    # ca.ca_path: the CA certificate (PEM) a client should trust
"""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _days(n):
    return datetime.timedelta(days=n)


def _new_key(key_type):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError("key_type must be 'ec' or 'rsa', not %r" % (key_type,))


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hostname):
    """An IP literal goes in as iPAddress, anything else as dNSName, as real clients expect."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _makedirs(directory):
    os.makedirs(directory, exist_ok=True)
    return directory


class CA:
    """A CA whose certificate is at ca_path; issue() signs leaf certificates with it."""

    def __init__(self, key, cert, ca_path):
        self.key = key
        self.cert = cert
        self.ca_path = ca_path

    def issue(self, hostname, directory, *, name="server", key_type="ec", expired=False):
        """
        Write DIRECTORY/NAME.pem (leaf then CA certificate) and DIRECTORY/NAME.key for hostname.
        Returns (cert_path, key_path).  expired=True makes a certificate that ended yesterday.
        """
        _makedirs(directory)
        key = _new_key(key_type)
        now = _now()
        if expired:
            not_before, not_after = now - _days(30), now - _days(1)
        else:
            not_before, not_after = now - _days(1), now + _days(90)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = os.path.join(directory, name + ".pem")
        key_path = os.path.join(directory, name + ".key")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(_key_pem(key))
        return cert_path, key_path


def make_ca(directory):
    """Create a CA (EC P-256) and write its certificate to DIRECTORY/ca.pem."""
    _makedirs(directory)
    key = _new_key("ec")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgate test CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _days(1))
        .not_valid_after(now + _days(365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return CA(key, cert, ca_path)
