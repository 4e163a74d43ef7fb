"""
The outbound TLS policy of delivery: which client TLS creator a route's policy uses (with our
client certificate and, for verify, the trust roots), and what to do when STARTTLS is not
offered, is refused or fails.

Owned here, apart from the SMTP dialogue, because Twisted's own choice is wrong for a gateway
(C5 of ../shared/twisted-mail-notes.md: no TLS without a hostname, verification without
fallback, a failed STARTTLS gives the message up); DeliverySender and Deliverer
(mailgate.delivery.client) ask these functions and act on the answer.  Not to be confused with
mailgate.tls, which loads the files and serves the listeners.

C5     Per-route TLS policy, see below; an opportunistic STARTTLS that fails its handshake is
       retried at once in plaintext on a new connection (logged as a downgrade).

TLS policy (RouteConfig.tls)
  none           never STARTTLS.
  opportunistic  STARTTLS when offered, certificate not verified; plaintext when not offered or
                 when the server refuses STARTTLS (same connection); a failed handshake -> one new
                 plaintext connection to the same hop at once (not when credentials would have to
                 be sent: AUTH needs TLS anyway).
  required       STARTTLS must succeed (certificate not verified); not offered or refused -> the
                 hop fails temporarily (451 4.7.4) before MAIL; handshake failure -> 451 4.7.5.
  verify         as required, and the chain is verified against tls_config.ca_file (the system's
                 trust store when None) and the name against Hop.name with service_identity (an
                 IP address must be an IP SAN); failure -> 451 4.7.5, reason logged.
  Our certificate (tls_config.certificate / private_key, when set) is offered when a server asks.
  Every policy speaks our TLS policy (mailgate.tls.policy_options: [tls] min_version, ECDHE with
  AEAD ciphers for TLS 1.2, no renegotiation); a server that cannot is, for opportunistic, a
  failed handshake and so a plaintext retry.
"""

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
    Certificate,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.delivery.outcome import _describe, _first, _label, _Reason
from mailgate.smtp.address import is_ip_address

# The client's namespace: these lines are the delivery client's, wherever the code lives.
log = Logger(namespace="mailgate.delivery.client")

POLICIES = ("none", "opportunistic", "required", "verify")
# "plaintext" is internal: the immediate retry after an opportunistic handshake failure.
_PLAINTEXT = "plaintext"


# --- client TLS creators -------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    Encrypt without verifying (opportunistic and required): CertificateOptions(verify=False) plus
    SNI when the hop's name is a DNS name.
    """

    def __init__(self, options, hostname):
        self._options = options
        self._sni = None
        if hostname and not is_ip_address(hostname):
            try:
                self._sni = hostname.encode("idna")
            except UnicodeError:
                self._sni = None

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _Hardened:
    """A client creator whose connections' context refuses renegotiation (mailgate.tls.harden)."""

    def __init__(self, creator):
        self.creator = creator

    def clientConnectionForTLS(self, tlsProtocol):
        from mailgate import tls

        return tls.harden(self.creator.clientConnectionForTLS(tlsProtocol))


class _TLSConfigError(Exception):
    pass


class ClientTLS:
    """
    The client TLS creators for one Deliverer, from tls_config: our certificate (offered when
    asked) and the trust store for tls = verify, each loaded once, when first needed.
    context() raises _TLSConfigError when they cannot be loaded.
    """

    def __init__(self, tls_config):
        self.tls_config = tls_config
        self._unverified = None
        self._trust = None
        self._client_cert = None

    def context(self, policy, hop):
        if policy in ("none", _PLAINTEXT):
            return None
        from mailgate import tls

        if policy in ("opportunistic", "required"):
            if self._unverified is None:
                options = CertificateOptions(verify=False, **self._policy(),
                                             **self._client_certificate())
                tls.harden(options.getContext())
                self._unverified = options
            return _UnverifiedClientTLS(self._unverified, hop.name)
        name = (hop.name or hop.address).rstrip(".")
        extra = self._client_certificate()
        extra.update(self._policy())
        return _Hardened(optionsForClientTLS(name, trustRoot=self._trust_root(),
                                             extraCertificateOptions=extra))

    def _policy(self):
        from mailgate import tls

        return tls.policy_options(getattr(self.tls_config, "min_version", None) or "TLSv1.2")

    def _trust_root(self):
        if self._trust is None:
            ca_file = self.tls_config.ca_file if self.tls_config else None
            if not ca_file:
                self._trust = platformTrust()
            else:
                from cryptography import x509
                from cryptography.hazmat.primitives import serialization

                try:
                    with open(ca_file, "rb") as f:
                        certs = x509.load_pem_x509_certificates(f.read())
                except (OSError, ValueError) as e:
                    raise _TLSConfigError("cannot load ca_file %s: %s" % (ca_file, e))
                self._trust = trustRootFromCertificates([
                    Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                    for c in certs
                ])
        return self._trust

    def _client_certificate(self):
        """CertificateOptions arguments offering our certificate, when one is configured."""
        if self._client_cert is None:
            config = self.tls_config
            if not config or not config.certificate or not config.private_key:
                self._client_cert = {}
            else:
                from mailgate import tls
                from mailgate.errors import ConfigError

                try:
                    chain, key = tls.load_chain(config), tls.load_key(config)
                except ConfigError as e:
                    raise _TLSConfigError(str(e))
                kwargs = dict(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
                try:
                    CertificateOptions(**kwargs).getContext()
                except TypeError:  # pyOpenSSL older than 24.3 wants its own types
                    from OpenSSL import crypto

                    kwargs = dict(
                        privateKey=crypto.PKey.from_cryptography_key(key),
                        certificate=crypto.X509.from_cryptography(chain[0]),
                        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
                    )
                except Exception as e:
                    raise _TLSConfigError("cannot use our certificate: %s" % (e,))
                self._client_cert = kwargs
        return dict(self._client_cert)


# --- when STARTTLS is not offered, refused or fails ----------------------------------------------


def not_offered(policy, hop):
    """
    The hop does not offer STARTTLS (or there is no context): None to go on in plaintext
    (opportunistic), else the reason the hop fails (logged).
    """
    if policy == "opportunistic":
        return None
    text = "TLS is required (tls = %s), but %s does not offer STARTTLS" % (policy, _label(hop))
    log.warn("{text}", text=text, hop_label=_label(hop), policy=policy)
    return _Reason(451, "4.7.4", text)


def refused(policy, hop, code, reason):
    """
    The hop refused STARTTLS with code and reason (its parsed reply): None to go on in plaintext
    on the same connection (opportunistic, logged as a downgrade), else the reason the hop fails.
    """
    if policy == "opportunistic":
        log.warn(
            "TLS downgrade: {hop_label} refused STARTTLS ({code} {text}); continuing in"
            " plaintext (tls = opportunistic)",
            hop_label=_label(hop), hop_name=hop.name, address=hop.address,
            port=hop.port, code=code, text=reason.text, event="tls_downgrade",
        )
        return None
    said = " ".join(str(p) for p in (reason.code, reason.status, reason.text) if p)
    text = "TLS is required (tls = %s), but %s refused STARTTLS: %s" % (
        policy, _label(hop), said)
    log.warn("{text}", text=text, hop_label=_label(hop), policy=policy)
    return _Reason(451, "4.7.4", text)


def handshake_failed(policy, hop, reason):
    """The connection went during the TLS handshake (reason: why): the hop's reason (logged)."""
    text = "TLS handshake with %s failed: %s" % (_label(hop), _describe(reason))
    log.warn(
        "TLS with {hop_label} failed (tls = {policy}): {reason}",
        hop_label=_label(hop), policy=policy, reason=_describe(reason),
    )
    return _Reason(451, "4.7.5", text)


def handshake_timed_out(policy, hop, timeout):
    """The TLS handshake took longer than timeout seconds: the hop's reason (logged)."""
    text = "TLS handshake with %s timed out after %gs" % (_label(hop), timeout)
    log.warn("TLS with {hop_label} failed (tls = {policy}): {reason}",
             hop_label=_label(hop), policy=policy, reason=text)
    return _Reason(451, "4.7.5", text)


def retry_in_plaintext(policy, route, hop, outcome):
    """
    After a connection to hop: whether to connect to it again at once in plaintext, because its
    TLS failed under tls = opportunistic and the route sends no credentials (logged either way).
    """
    if not (outcome.tls_failed and policy == "opportunistic"):
        return False
    if route.username:
        log.warn(
            "Not retrying {hop_label} in plaintext after the TLS failure: the route"
            " authenticates, and credentials are only sent over TLS",
            hop_label=_label(hop),
        )
        return False
    log.warn(
        "TLS downgrade: STARTTLS with {hop_label} failed ({reason});"
        " retrying in plaintext at once (tls = opportunistic)",
        hop_label=_label(hop), hop_name=hop.name, address=hop.address,
        port=hop.port, reason=_first(outcome).text, event="tls_downgrade",
    )
    return True
