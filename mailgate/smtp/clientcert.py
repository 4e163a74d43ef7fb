"""
Certificate-based relay (a listener's relay_client_certs), as Exchange Online's certificate-based
connectors: a client whose TLS certificate chains to [tls] client_ca_file and names one of the
listed hosts (subject common name, or a DNS name of its subjectAltName) may relay without AUTH.

Only a listener with relay_client_certs asks for client certificates (its own TLS context; the
others never send a CertificateRequest).  The handshake never fails for a missing or untrusted
certificate (OpenSSL's verdict is overridden: a client without one is an ordinary client); the
chain is checked here instead, with cryptography's X.509 verifier (path to client_ca_file,
validity at the reactor's time, the clientAuth purpose), the first time the session needs to
know (its MAIL or RCPT), once per TLS session.  A certificate that does not check out is logged
and grants nothing.
"""

import datetime

from OpenSSL import SSL
from twisted.logger import Logger

log = Logger()


def _verify_any(connection, certificate, errno, depth, ok):
    return True  # asked for, never required: the chain is judged by ClientCertificates.name()


class ClientCertificates:
    """The relay_client_certs of one listener and the CAs of [tls] client_ca_file."""

    def __init__(self, names, ca_file):
        from cryptography import x509
        from cryptography.x509.verification import Store

        self.names = {name.lower() for name in names}
        self.ca_file = ca_file
        with open(ca_file, "rb") as f:
            self.cas = x509.load_pem_x509_certificates(f.read())
        self.store = Store(self.cas)

    def server_options(self, options, session_id):
        """
        options (a fresh CertificateOptions of our own, not shared with other listeners) set to
        ask for a client certificate and to name client_ca_file's CAs in the request.
        """
        context = options.getContext()
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _verify_any)
        context.load_client_ca(self.ca_file.encode())
        context.set_session_id(session_id[:32])
        return options

    def name(self, transport, now):
        """
        The listed name the session's verified client certificate carries, or None (no TLS, no
        certificate, an untrusted or expired one, or none of the names).  now: POSIX time.
        """
        from cryptography.x509.verification import PolicyBuilder, VerificationError

        try:
            handle = transport.getHandle()
            peer = handle.get_peer_certificate()
            chain = handle.get_peer_cert_chain() or []
        except Exception:
            return None
        if peer is None:
            return None
        leaf = peer.to_cryptography()
        intermediates = [c.to_cryptography() for c in chain]
        intermediates = [c for c in intermediates if c != leaf]
        when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        verifier = PolicyBuilder().store(self.store).time(when).build_client_verifier()
        try:
            verifier.verify(leaf, intermediates)
        except (VerificationError, ValueError) as e:
            log.info("client certificate {subject} not trusted: {error}",
                     subject=leaf.subject.rfc4514_string(), error=str(e))
            return None
        for name in _names(leaf):
            if name.lower() in self.names:
                return name.lower()
        log.info("client certificate {subject} is trusted but names none of relay_client_certs",
                 subject=leaf.subject.rfc4514_string())
        return None


def _names(cert):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return [n for n in names if isinstance(n, str)]


def permitted(server):
    """
    The name whose certificate lets server's session relay, or None; worked out once per TLS
    session (STARTTLS resets it) and logged when it grants.
    """
    certificates = getattr(server.factory, "client_certs", None)
    if certificates is None or not server.tls:
        return None
    if server._cert_checked:
        return server.cert_name
    server._cert_checked = True
    server.cert_name = certificates.name(server.transport, server.clock.seconds())
    if server.cert_name is not None:
        log.info("client certificate {name} from {client} on {listener}: relaying permitted",
                 name=server.cert_name, client=server.client_ip, listener=server.listener.name)
    return server.cert_name
