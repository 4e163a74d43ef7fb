"""
TLS for the listeners: load (or, for testing, generate) the certificate and build the server
context with a modern policy, so every listener speaks the same TLS.

Policy: TLS 1.2 or newer (or 1.3 only), and for TLS 1.2 only ECDHE key exchange with AEAD ciphers
(AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites are all AEAD.  The server picks the cipher; no
compression, no renegotiation.  Delivery uses the same versions and ciphers (policy_options()).

CertificateWatch picks up a certificate or key renewed on disk (certbot, acme.sh) without a
SIGHUP: it looks every WATCH_INTERVAL seconds, loads a change once it has stayed the same for one
look (so a half-written pair is not tried), and hands the new context on; a broken file is logged
in one line and the old certificate stays in use.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgate.config.types import private_file_problem
from mailgate.errors import ConfigError

log = Logger()

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
MIN_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}
EXPIRY_WARNING = datetime.timedelta(days=30)
WATCH_INTERVAL = 20.0  # seconds between looks at the certificate files: a change is live in < 1m


def policy_options(min_version="TLSv1.2"):
    """The CertificateOptions arguments of our TLS policy (versions, ciphers), in and out."""
    return dict(raiseMinimumTo=MIN_VERSIONS[min_version],
                acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS))


def harden(context):
    """
    Options CertificateOptions leaves out: no renegotiation at all (client-initiated DoS).
    context: an SSL.Context not used yet, or an SSL.Connection.
    """
    context.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0x40000000))
    return context


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _validity(cert):
    """(not before, not after) as aware datetimes, on old cryptography (<42) too."""
    try:
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:
        utc = datetime.timezone.utc
        return cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)


# --- self-signed certificates ------------------------------------------------------------------


def _self_signed(hostname, key):
    now = _now()
    # A common name longer than 64 characters is invalid; the SAN is what clients check anyway.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostname)] if len(hostname) <= 64 else []
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _write_new(path, data, mode):
    """Create path with data; O_EXCL so an existing file is never overwritten."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # regardless of the umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def ensure_certificate(tls_config, hostname):
    """
    Generate a self-signed certificate for hostname when generate_self_signed is set and the
    certificate or key is missing (both must be missing: existing files are never overwritten).
    Returns True when it generated one.  Lets a test setup start with TLS and no PKI.
    """
    cert_path, key_path = tls_config.certificate, tls_config.private_key
    if not tls_config.generate_self_signed or not cert_path or not key_path:
        return False
    cert_exists, key_exists = os.path.exists(cert_path), os.path.exists(key_path)
    if cert_exists and key_exists:
        return False
    if cert_exists or key_exists:
        log.error(
            "Not generating a self-signed certificate: {existing} exists but {missing} does not,"
            " and existing files are never overwritten",
            existing=cert_path if cert_exists else key_path,
            missing=key_path if cert_exists else cert_path,
        )
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(hostname, key)
    _write_new(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.warn(
        "GENERATED A SELF-SIGNED CERTIFICATE for {hostname} at {certificate}: for testing only,"
        " mail clients and servers will not trust it; configure a real certificate",
        hostname=hostname,
        certificate=cert_path,
        private_key=key_path,
    )
    return True


# --- loading -----------------------------------------------------------------------------------


def _read(path, config_path, key):
    if not path:
        raise ConfigError(config_path, "tls", key, "no file configured")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(config_path, "tls", key, "cannot read %s: %s" % (path, e.strerror or e))


def load_chain(tls_config, config_path="<config>"):
    """The certificates (cryptography objects) in the certificate file, leaf first."""
    path = tls_config.certificate
    data = _read(path, config_path, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise ConfigError(config_path, "tls", "certificate", "no PEM certificate in %s" % (path,))
    return chain


def load_key(tls_config, config_path="<config>"):
    """The private key (a cryptography object) in the key file."""
    path = tls_config.private_key
    problem = private_file_problem(path) if path else None
    if problem:
        raise ConfigError(config_path, "tls", "private_key", problem)
    data = _read(path, config_path, "private_key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, crypto.Error) as e:
        # TypeError: the key is encrypted (there is nobody to type a passphrase at start-up).
        raise ConfigError(
            config_path, "tls", "private_key",
            "cannot load the private key in %s (need an unencrypted PEM key): %s" % (path, e),
        )


def _spki(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def server_context_factory(tls_config, config_path="<config>"):
    """
    A CertificateOptions for the listeners, from tls_config.  Every problem with the files is a
    ConfigError on [tls] certificate or [tls] private_key, raised now rather than at the first
    handshake.
    """
    chain = load_chain(tls_config, config_path)
    key = load_key(tls_config, config_path)
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise ConfigError(
            config_path, "tls", "private_key",
            "the private key in %s does not match the certificate in %s"
            % (tls_config.private_key, tls_config.certificate),
        )
    if tls_config.min_version not in MIN_VERSIONS:
        raise ConfigError(
            config_path, "tls", "min_version",
            "must be one of %s, not %r" % (", ".join(MIN_VERSIONS), tls_config.min_version),
        )
    try:
        return _options(key, chain, MIN_VERSIONS[tls_config.min_version])
    except (SSL.Error, crypto.Error, TypeError, ValueError) as e:
        raise ConfigError(
            config_path, "tls", "private_key", "cannot use this key and certificate: %s" % (e,)
        )


def _options(key, chain, min_version):
    """
    The CertificateOptions, built and tried now so problems show at start-up, not in the first
    client's handshake.  pyOpenSSL >= 24.3 takes cryptography objects (and deprecates its own);
    older versions only take its own.
    """
    def build(key, chain):
        options = CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=min_version,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        )
        harden(options.getContext())  # the context is cached: every connection gets it
        return options

    try:
        return build(key, chain)
    except TypeError:
        return build(
            crypto.PKey.from_cryptography_key(key), [crypto.X509.from_cryptography(c) for c in chain]
        )


# --- check-config ------------------------------------------------------------------------------


def _names(cert):
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def _covers(pattern, hostname):
    """RFC 6125 matching: exact, or a wildcard standing for exactly the left-most label."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = hostname.partition(".")
        return bool(first and dot) and rest == pattern[2:]
    return pattern == hostname


def check_tls_config(config):
    """
    For ``mailgate check-config``: validate the TLS files when a listener uses TLS.  Returns
    warnings (strings); raises ConfigError for what would stop the gateway (or its clients).

    ConfigError: a file that does not load, a key that does not match the certificate, an
    expired certificate.  Warnings: not valid yet, expiring within 30 days, names not covering
    [gateway] hostname, a self-signed certificate, a chain whose certificates are not each
    issued by the next, an expired certificate later in the chain.
    """
    if all(listener.tls == "none" for listener in config.listeners):
        return []
    tls, hostname = config.tls, config.gateway.hostname
    if tls.generate_self_signed and not (
        tls.certificate and tls.private_key
        and os.path.exists(tls.certificate) and os.path.exists(tls.private_key)
    ):
        return [
            "[tls] certificate %s does not exist yet: a SELF-SIGNED certificate for %s will be"
            " generated at start-up (testing only; clients will not trust it)"
            % (tls.certificate, hostname)
        ]
    server_context_factory(tls, config.path)  # the files load, and the key matches
    chain = load_chain(tls, config.path)
    leaf = chain[0]
    not_before, not_after = _validity(leaf)
    now, warnings = _now(), []
    if not_after <= now:
        raise ConfigError(
            config.path, "tls", "certificate",
            "the certificate in %s expired on %s" % (tls.certificate, not_after.date()),
        )
    if not_before > now:
        warnings.append(
            "[tls] certificate %s is not valid before %s" % (tls.certificate, not_before)
        )
    if not_after - now < EXPIRY_WARNING:
        warnings.append("[tls] certificate %s expires on %s" % (tls.certificate, not_after.date()))
    names = _names(leaf)
    if not any(_covers(name, hostname) for name in names):
        warnings.append(
            "[tls] certificate %s names (%s) do not cover [gateway] hostname %s"
            % (tls.certificate, ", ".join(names) or "none", hostname)
        )
    return warnings + _chain_warnings(tls.certificate, chain, now)


def _subject(cert):
    return cert.subject.rfc4514_string() or "(empty subject)"


def _issued_by(cert, issuer):
    """Whether issuer's key signed cert and issuer's subject is cert's issuer."""
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError (names), InvalidSignature, TypeError (key types), ...
        return False
    return True


def _chain_warnings(path, chain, now):
    """
    The certificate file's chain, as far as it goes: a self-signed leaf; each certificate issued
    by the next one; certificates after the leaf expired or not yet valid.  Whether the chain
    ends at a root is not asked: the root is best left out, clients have it.
    """
    warnings = []
    leaf = chain[0]
    if leaf.issuer == leaf.subject and _issued_by(leaf, leaf):
        warnings.append(
            "[tls] certificate %s is self-signed (%s): servers that verify certificates will not"
            " trust it; use one from a CA" % (path, _subject(leaf))
        )
    for index in range(len(chain) - 1):
        cert, following = chain[index], chain[index + 1]
        if not _issued_by(cert, following):
            warnings.append(
                "[tls] certificate %s: certificate %d (%s) is not issued by the one after it"
                " (%s): the chain is out of order or holds a wrong intermediate; put the"
                " leaf first, then each issuer in turn"
                % (path, index + 1, _subject(cert), _subject(following))
            )
    for index, cert in enumerate(chain[1:], 2):
        not_before, not_after = _validity(cert)
        if not_after <= now:
            warnings.append(
                "[tls] certificate %s: chain certificate %d (%s) expired on %s: replace it with"
                " the CA's current one" % (path, index, _subject(cert), not_after.date())
            )
        elif not_before > now:
            warnings.append(
                "[tls] certificate %s: chain certificate %d (%s) is not valid before %s"
                % (path, index, _subject(cert), not_before)
            )
    return warnings


# --- sessions ----------------------------------------------------------------------------------


def tls_session_info(transport):
    """
    (protocol version, cipher name) of a TLS transport, e.g. ("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    for Received headers and logs; (None, None) when the transport is not (yet) using TLS.
    """
    try:
        handle = transport.getHandle()
        version, cipher = handle.get_protocol_version_name(), handle.get_cipher_name()
    except Exception:
        return None, None
    if not isinstance(version, str) or not isinstance(cipher, str):
        return None, None
    return version, cipher


# --- renewed files -----------------------------------------------------------------------------


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError as e:
        return ("missing", e.errno)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


class CertificateWatch:
    """
    Watches tls_config's certificate and private key on clock; on_new(options) gets the
    CertificateOptions of a good new pair.  start() / stop(); check() is one look.
    """

    def __init__(self, clock, tls_config, on_new, config_path="<config>", interval=WATCH_INTERVAL):
        self.clock = clock
        self.on_new = on_new
        self.config_path = config_path
        self.interval = interval
        self._loop = None
        self.watch(tls_config)

    def watch(self, tls_config):
        """Watch these files from now on (a reload may name others); what is there is current."""
        self.tls_config = tls_config
        self._loaded = self._stamps()
        self._seen = self._loaded  # what the last look saw
        self._failed = None  # the stamps of a pair that did not load (reported once)

    def _stamps(self):
        return (_stamp(self.tls_config.certificate), _stamp(self.tls_config.private_key))

    def start(self):
        if self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self):
        """One look: returns True when a new certificate was taken into use."""
        stamps = self._stamps()
        previous, self._seen = self._seen, stamps
        if stamps == self._loaded or stamps != previous or stamps == self._failed:
            return False  # unchanged, still changing, or already found broken
        try:
            options = server_context_factory(self.tls_config, self.config_path)
        except ConfigError as e:
            self._failed = stamps
            log.error("renewed certificate not used: {error}; the old certificate stays in use",
                      error=str(e))
            return False
        self._loaded, self._failed = stamps, None
        self.on_new(options)
        log.info("certificate {certificate} renewed on disk: new sessions use it",
                 certificate=self.tls_config.certificate)
        return True
