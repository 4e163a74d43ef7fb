"""
DKIM signing (RFC 6376 rsa-sha256, RFC 8463 ed25519-sha256) with dkimpy, and key generation.

The private key is read once, at start-up, so that a bad key is a ConfigError before any mail is
accepted, not a failure per message.  Signing runs dkimpy in a thread (its RSA is pure Python).

Key files:

* RSA: PEM, PKCS#8 ("BEGIN PRIVATE KEY", what `mailgate dkim-keygen` and `openssl genpkey`
  write) or PKCS#1 ("BEGIN RSA PRIVATE KEY", what `openssl genrsa` and dkimpy's `dknewkey`
  write); at least 2048 bits (RFC 8301 asks for 1024 at least; 2048 is what is recommended).
* Ed25519: PEM PKCS#8 ("BEGIN PRIVATE KEY", what `mailgate dkim-keygen --type ed25519` and
  `openssl genpkey -algorithm ed25519` write), or dkimpy's `dknewkey --ktype ed25519` format: the
  32-byte seed in base64 on one line.  Signing with Ed25519 needs PyNaCl (dkimpy uses it).

The key type is found from the key itself; nothing in the configuration says it.
"""

import base64
import binascii
import email.parser
import email.policy
import os
import re

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer
from twisted.logger import Logger

from mailgate.errors import ConfigError

log = Logger()

MIN_RSA_BITS = 2048
RSA_BITS = (2048, 3072, 4096)
KEY_TYPES = ("rsa", "ed25519")

_MAX_KEY_FILE = 64 * 1024
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# dkimpy refuses to sign these (RFC 6376 5.4.1 SHOULD NOT); say so at start-up, not per message.
_NOT_SIGNABLE = frozenset(h.decode("ascii").lower() for h in dkim.DKIM.SHOULD_NOT)
_SELECTOR = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")

class DKIMSigner:
    """
    Signs outgoing messages for the configured domains.

    dkim_config is a mailgate.config.DKIMConfig; run_in_thread(f, *args) -> Deferred runs f off
    the reactor (a thread pool; tests pass a synchronous runner).  With no sign_domains the signer
    signs nothing and needs no key.
    """

    def __init__(self, dkim_config, run_in_thread, config_path="<config>"):
        self.config = dkim_config
        self._run = run_in_thread
        self.domains = tuple(d.lower().rstrip(".") for d in dkim_config.sign_domains or ())
        self.key_type = None  # "rsa" | "ed25519"
        self._key = None  # what dkimpy wants: PKCS#1 PEM for RSA, the base64 seed for Ed25519
        self._headers = tuple(h.lower().encode("ascii") for h in dkim_config.headers)
        if not self.domains and dkim_config.private_key is None:
            return
        if dkim_config.private_key is None:
            raise ConfigError(
                config_path, "dkim", "private_key", "required, because sign_domains is set"
            )
        if not dkim_config.selector:
            message = "required, because sign_domains is set"
            raise ConfigError(config_path, "dkim", "selector", message)
        if not _SELECTOR.fullmatch(dkim_config.selector):
            message = "expected a selector like mail2024 (DNS labels), got %r"
            message %= (dkim_config.selector,)
            raise ConfigError(config_path, "dkim", "selector", message)
        self._selector = dkim_config.selector.encode("ascii")
        self._check_headers(config_path)
        self.key_type, self._key = _load_key(config_path, dkim_config.private_key)

    def _check_headers(self, config_path):
        if b"from" not in self._headers:
            raise ConfigError(config_path, "dkim", "headers", "must include from (RFC 6376 5.4)")
        for name in self._headers:
            if name.decode("ascii") in _NOT_SIGNABLE:
                message = "%s must not be signed (RFC 6376 5.4.1)" % name.decode("ascii")
                raise ConfigError(config_path, "dkim", "headers", message)

    def domain_for(self, data):
        """
        The d= domain for data: the sign_domains entry that is the RFC5322.From domain or a parent
        of it (the longest such entry).  None when there is not exactly one From header with
        exactly one address, or its domain is not ours.
        """
        if not self.domains or self._key is None:
            return None
        domain = from_domain(data)
        if domain is None:
            return None
        matches = [d for d in self.domains if domain == d or domain.endswith("." + d)]
        return max(matches, key=len) if matches else None

    def sign(self, data):
        """
        Deferred firing with the DKIM-Signature header field (bytes, CRLF-terminated, folded) to
        put in front of data, or None when no sign domain applies (or dkimpy cannot parse the
        message, which is logged: the message then goes unsigned rather than not at all).
        """
        domain = self.domain_for(data)
        if domain is None:
            return defer.succeed(None)
        return self._run(self._sign, bytes(data), domain)

    def _sign(self, data, domain):
        algorithm = b"ed25519-sha256" if self.key_type == "ed25519" else b"rsa-sha256"
        try:
            header = dkim.sign(
                data,
                self._selector,
                domain.encode("ascii"),
                self._key,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=algorithm,
                include_headers=list(self._headers),
                linesep=b"\r\n",
            )
        except dkim.DKIMException as e:
            log.warn("DKIM: not signing for {domain}: {error}", domain=domain, error=str(e))
            return None
        if not header.endswith(b"\r\n"):
            header += b"\r\n"
        return header


def from_domain(data):
    """
    The domain of the single address of the single From header field of data (lower case, as an
    A-label), or None.
    """
    match = _HEADER_END.search(data)
    block = data[: match.start()] if match else data
    if data.startswith((b"\r\n", b"\n")):
        return None
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            block + b"\r\n\r\n"
        )
        froms = headers.get_all("from") or []
        if len(froms) != 1:
            return None
        addresses = froms[0].addresses
    except Exception:  # the email package's header parser has raised on odd input before
        return None
    if len(addresses) != 1:
        return None
    domain = (addresses[0].domain or "").strip().rstrip(".").lower()
    try:
        # Raw UTF-8 (RFC 6532) comes through the parser as surrogate escapes.
        domain = domain.encode("ascii", "surrogateescape").decode("utf-8")
        if not domain.isascii():
            domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return domain if re.fullmatch(r"[a-z0-9.-]+", domain) else None


# --- keys -------------------------------------------------------------------------------------


def _load_key(config_path, path):
    """-> (key type, key as dkimpy wants it); every problem is a ConfigError on private_key."""

    def fail(message):
        return ConfigError(config_path, "dkim", "private_key", message)

    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise fail("cannot read %s: %s" % (path, e.strerror or e)) from None
    if len(raw) > _MAX_KEY_FILE:
        raise fail("%s: larger than 64K, not a key file" % path)
    if b"-----BEGIN" in raw:
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except TypeError:
            raise fail("%s: the key is encrypted; mailgate needs it unencrypted" % path) from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise fail("%s: not a usable PEM private key (%s)" % (path, e)) from None
    else:
        try:
            seed = base64.b64decode(b"".join(raw.split()), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            message = "%s: not a PEM private key, nor a base64 Ed25519 key (as dknewkey writes)"
            raise fail(message % path)
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            message = "%s: RSA key of %d bits, at least %d are needed (RFC 8301)"
            raise fail(message % (path, key.key_size, MIN_RSA_BITS))
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return "rsa", pem
    if isinstance(key, ed25519.Ed25519PrivateKey):
        try:
            import nacl.signing  # noqa: F401  (dkimpy signs Ed25519 with it)
        except ImportError:
            raise fail("%s: Ed25519 keys need PyNaCl (pip install pynacl)" % path) from None
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return "ed25519", base64.b64encode(seed)
    raise fail("%s: a %s key; DKIM keys are RSA or Ed25519" % (path, type(key).__name__))


def generate_key(key_type="rsa", bits=2048):
    """
    A new key pair -> (private key as PKCS#8 PEM bytes, the DNS TXT record value as str).
    """
    if key_type == "rsa":
        if bits not in RSA_BITS:
            raise ValueError("RSA keys are %s bits" % ", ".join(map(str, RSA_BITS)))
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raise ValueError("key type must be one of %s" % ", ".join(KEY_TYPES))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    txt = "v=DKIM1; k=%s; p=%s" % (key_type, base64.b64encode(public).decode("ascii"))
    return pem, txt


def dns_record(selector, domain, txt):
    """The zone-file line to publish txt at SELECTOR._domainkey.DOMAIN (strings of <= 255 bytes)."""
    chunks = [txt[i : i + 255] for i in range(0, len(txt), 255)] or [""]
    quoted = " ".join('"%s"' % chunk for chunk in chunks)
    return "%s._domainkey.%s. IN TXT %s" % (selector, domain.rstrip("."), quoted)


def write_key(path, pem):
    """Write pem to a new file at path, mode 0600; FileExistsError if there is one already."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
