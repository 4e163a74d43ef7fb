"""Tests for mailgate.tls: certificates, the server context and its policy, session info."""

import datetime
import os
import socket
import ssl
import stat
import warnings

from cryptography import x509
from twisted.internet import defer, protocol, reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate import tls
from mailgate.config import (
    AuthConfig, Config, GatewayConfig, Limits, ListenerConfig, QueueConfig, TLSConfig,
)
from mailgate.errors import ConfigError
from tests.tlsutil import make_ca

HOST = "mx.example.test"


def make_config(tls_config, hostname=HOST, listener_tls="required"):
    listener = ListenerConfig(
        name="submission", endpoint="tcp:587", role="submission", tls=listener_tls, auth="required"
    )
    return Config(
        path="/etc/mailgate.ini",
        gateway=GatewayConfig(hostname=hostname),
        limits=Limits(),
        queue=QueueConfig(),
        tls=tls_config,
        auth=AuthConfig(),
        listeners=(listener,),
    )


class CertificateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.ca = make_ca(self.dir)

    def issued(self, **kwargs):
        cert, key = self.ca.issue(HOST, self.dir, **kwargs)
        return TLSConfig(certificate=cert, private_key=key)

    def assertConfigError(self, tls_config, key, text):
        e = self.assertRaises(ConfigError, tls.server_context_factory, tls_config, "/etc/mailgate.ini")
        self.assertEqual((e.file, e.section, e.key), ("/etc/mailgate.ini", "tls", key))
        self.assertIn(text, e.message)
        return e

    def test_generate_self_signed(self):
        base = os.path.join(self.mktemp(), "new", "dir")
        config = TLSConfig(
            certificate=os.path.join(base, "cert.pem"),
            private_key=os.path.join(base, "key.pem"),
            generate_self_signed=True,
        )
        self.assertTrue(tls.ensure_certificate(config, HOST))
        self.assertEqual(stat.S_IMODE(os.stat(config.private_key).st_mode), 0o600)
        with open(config.certificate, "rb") as f:
            before = f.read()
        cert = x509.load_pem_x509_certificate(before)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [HOST])
        self.assertGreater(tls._validity(cert)[1] - tls._now(), datetime.timedelta(days=360))
        self.assertIsNotNone(tls.server_context_factory(config).getContext())
        # Never again, never overwriting.
        self.assertFalse(tls.ensure_certificate(config, "other.example.test"))
        with open(config.certificate, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_generate_only_when_asked(self):
        base = self.mktemp()
        config = TLSConfig(certificate=os.path.join(base, "c"), private_key=os.path.join(base, "k"))
        self.assertFalse(tls.ensure_certificate(config, HOST))
        self.assertFalse(os.path.exists(base))

    def test_half_present_is_not_overwritten(self):
        cert, _ = self.ca.issue(HOST, self.dir)
        config = TLSConfig(
            certificate=cert, private_key=os.path.join(self.dir, "missing.key"), generate_self_signed=True
        )
        self.assertFalse(tls.ensure_certificate(config, HOST))
        self.assertFalse(os.path.exists(config.private_key))

    def test_chain(self):
        config = self.issued(key_type="rsa")
        options = tls.server_context_factory(config)
        self.assertEqual(len(options.extraCertChain), 1)
        self.assertEqual(options.extraCertChain[0].subject.rfc4514_string(), "CN=mailgate test CA")
        self.assertEqual(options.certificate.subject.rfc4514_string(), "CN=" + HOST)

    def test_mismatched_key(self):
        config = self.issued()
        _, other_key = self.ca.issue(HOST, self.dir, name="other")
        e = self.assertConfigError(
            TLSConfig(certificate=config.certificate, private_key=other_key), "private_key", "does not match"
        )
        self.assertIn("[tls] private_key", str(e))

    def test_unreadable_files(self):
        config = self.issued()
        missing = os.path.join(self.dir, "missing.pem")
        self.assertConfigError(
            TLSConfig(certificate=missing, private_key=config.private_key), "certificate", "cannot read"
        )
        self.assertConfigError(
            TLSConfig(certificate=config.certificate, private_key=missing), "private_key", "cannot read"
        )

    def test_garbage(self):
        config = self.issued()
        garbage = os.path.join(self.dir, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not PEM at all\n")
        self.assertConfigError(
            TLSConfig(certificate=garbage, private_key=config.private_key), "certificate", "no PEM certificate"
        )
        self.assertConfigError(
            TLSConfig(certificate=config.certificate, private_key=garbage), "private_key", "cannot load"
        )
        # A certificate where the key should be.
        self.assertConfigError(
            TLSConfig(certificate=config.certificate, private_key=config.certificate), "private_key", "cannot load"
        )

    def test_bad_min_version(self):
        config = self.issued()
        self.assertConfigError(
            TLSConfig(certificate=config.certificate, private_key=config.private_key, min_version="SSLv3"),
            "min_version", "TLSv1.2",
        )


class CheckConfigTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.ca = make_ca(self.dir)

    def config(self, hostname=HOST, issued_for=HOST, **kwargs):
        cert, key = self.ca.issue(issued_for, self.dir, **kwargs)
        return make_config(TLSConfig(certificate=cert, private_key=key), hostname=hostname)

    def test_good(self):
        self.assertEqual(tls.check_tls_config(self.config()), [])

    def test_no_tls_listener_skips(self):
        config = make_config(TLSConfig(certificate="/nonexistent", private_key="/nonexistent"), listener_tls="none")
        self.assertEqual(tls.check_tls_config(config), [])

    def test_will_generate(self):
        config = make_config(
            TLSConfig(
                certificate=os.path.join(self.dir, "c.pem"),
                private_key=os.path.join(self.dir, "k.pem"),
                generate_self_signed=True,
            )
        )
        [warning] = tls.check_tls_config(config)
        self.assertIn("self-signed", warning.lower())

    def test_missing_file(self):
        config = make_config(TLSConfig(certificate="/nonexistent/c", private_key="/nonexistent/k"))
        e = self.assertRaises(ConfigError, tls.check_tls_config, config)
        self.assertEqual((e.file, e.key), ("/etc/mailgate.ini", "certificate"))

    def test_hostname_not_covered(self):
        [warning] = tls.check_tls_config(self.config(hostname="mail.example.test"))
        self.assertIn("do not cover [gateway] hostname mail.example.test", warning)

    def test_wildcard(self):
        self.assertEqual(tls.check_tls_config(self.config(issued_for="*.example.test")), [])
        [warning] = tls.check_tls_config(self.config(hostname="a.mx.example.test", issued_for="*.example.test"))
        self.assertIn("do not cover", warning)

    def test_expires_soon(self):
        config = self.config()
        real = tls._now
        self.patch(tls, "_now", lambda: real() + datetime.timedelta(days=70))
        [warning] = tls.check_tls_config(config)
        self.assertIn("expires on", warning)

    def test_expired(self):
        e = self.assertRaises(ConfigError, tls.check_tls_config, self.config(expired=True))
        self.assertEqual((e.section, e.key), ("tls", "certificate"))
        self.assertIn("expired", e.message)


class ServerProtocol(protocol.Protocol):
    """Answers the first data with b"ok", noting the TLS session then."""

    def dataReceived(self, data):
        if not self.factory.sessions:
            self.factory.sessions.append(tls.tls_session_info(self.transport))
            self.transport.write(b"ok")

    def connectionLost(self, reason):
        self.factory.lost.callback(None)


class ServerFactory(protocol.ServerFactory):
    protocol = ServerProtocol

    def __init__(self):
        self.sessions = []
        self.lost = defer.Deferred()


def client_context(ca_path, maximum=None, ciphers=None):
    ctx = ssl.create_default_context(cafile=ca_path)
    if maximum is not None:
        # Let the client go as low as asked: the server must be the one refusing.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
        ctx.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    return ctx


def talk(port, ctx):
    """In a thread: handshake, exchange a line, return the client's view of the session."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=HOST) as conn:
            conn.sendall(b"hi")
            reply = conn.recv(2)
            return conn.version(), conn.cipher()[0], reply


class HandshakeTests(TestCase):
    """Real handshakes on 127.0.0.1 against the policy server_context_factory builds."""

    def setUp(self):
        directory = self.mktemp()
        self.ca = make_ca(directory)
        self.directory = directory

    def listen(self, key_type="ec", min_version="TLSv1.2"):
        cert, key = self.ca.issue(HOST, self.directory, key_type=key_type)
        options = tls.server_context_factory(TLSConfig(certificate=cert, private_key=key, min_version=min_version))
        self.factory = ServerFactory()
        port = reactor.listenSSL(0, self.factory, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def connect(self, ctx, **kwargs):
        """The client's result (or failure), once the server side is closed too."""
        port = self.listen(**kwargs)
        result = yield defer.DeferredList(
            [threads.deferToThread(talk, port, ctx), self.factory.lost], consumeErrors=True
        )
        (ok, value), _ = result
        if not ok:
            value.trap(ssl.SSLError)
            return value.value
        return value

    def assertRefused(self, error):
        """The handshake failed because the server said no (an alert), not the client."""
        self.assertIsInstance(error, ssl.SSLError)
        self.assertIn("ALERT", error.reason or "")
        self.assertEqual(self.factory.sessions, [])

    @defer.inlineCallbacks
    def test_default_client(self):
        version, cipher, reply = yield self.connect(client_context(self.ca.ca_path))
        self.assertEqual((version, reply), ("TLSv1.3", b"ok"))
        self.assertEqual(self.factory.sessions, [("TLSv1.3", cipher)])

    @defer.inlineCallbacks
    def test_tls12_ecdhe_aead(self):
        for key_type in ["ec", "rsa"]:
            version, cipher, reply = yield self.connect(
                client_context(self.ca.ca_path, maximum=ssl.TLSVersion.TLSv1_2), key_type=key_type
            )
            self.assertEqual((version, reply), ("TLSv1.2", b"ok"))
            self.assertTrue(cipher.startswith("ECDHE-"), cipher)
            self.assertTrue("GCM" in cipher or "CHACHA20-POLY1305" in cipher, cipher)
            self.assertEqual(self.factory.sessions, [("TLSv1.2", cipher)])

    @defer.inlineCallbacks
    def test_tls11_refused(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            maximum = ssl.TLSVersion.TLSv1_1
        error = yield self.connect(client_context(self.ca.ca_path, maximum=maximum))
        self.assertRefused(error)

    @defer.inlineCallbacks
    def test_static_rsa_cbc_refused(self):
        ctx = client_context(self.ca.ca_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
        error = yield self.connect(ctx, key_type="rsa")
        self.assertRefused(error)

    @defer.inlineCallbacks
    def test_tls13_only(self):
        error = yield self.connect(
            client_context(self.ca.ca_path, maximum=ssl.TLSVersion.TLSv1_2), min_version="TLSv1.3"
        )
        self.assertRefused(error)
        version, _, _ = yield self.connect(client_context(self.ca.ca_path), min_version="TLSv1.3")
        self.assertEqual(version, "TLSv1.3")


class ContextOptionTests(SynchronousTestCase):
    """What the handshake tests cannot show: no compression, no renegotiation, server order."""

    def options(self, context):
        return context.set_options(0)  # pyOpenSSL answers with the options now set

    def test_server_context(self):
        from OpenSSL import SSL

        ca = make_ca(self.mktemp())
        cert, key = ca.issue(HOST, self.mktemp())
        context = tls.server_context_factory(TLSConfig(certificate=cert, private_key=key)).getContext()
        options = self.options(context)
        for flag in (SSL.OP_NO_COMPRESSION, SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_TLSv1,
                     SSL.OP_NO_TLSv1_1, SSL.OP_NO_SSLv3, SSL.OP_NO_RENEGOTIATION):
            self.assertTrue(options & flag, hex(flag))

    def test_delivery_contexts_use_the_same_policy(self):
        from OpenSSL import SSL

        from mailgate.delivery.tls import ClientTLS
        from mailgate.envelope import Hop

        client = ClientTLS(TLSConfig(min_version="TLSv1.3"))
        hop = Hop(name="mx.example.com", address="192.0.2.1", port=25)
        context = client.context("opportunistic", hop)._options.getContext()
        options = self.options(context)
        for flag in (SSL.OP_NO_TLSv1_2, SSL.OP_NO_TLSv1_1, SSL.OP_NO_RENEGOTIATION,
                     SSL.OP_NO_COMPRESSION):
            self.assertTrue(options & flag, hex(flag))
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.internet import protocol as _protocol

        verified = client.context("verify", hop)
        factory = TLSMemoryBIOFactory(verified, True, _protocol.ClientFactory.forProtocol(_protocol.Protocol))
        connection = verified.clientConnectionForTLS(factory.buildProtocol(None))
        self.assertTrue(self.options(connection) & SSL.OP_NO_RENEGOTIATION)
        self.assertTrue(self.options(connection) & SSL.OP_NO_TLSv1_2)


class SessionInfoTests(SynchronousTestCase):
    def test_not_tls(self):
        class Plain:
            def getHandle(self):
                return socket.socket()

        plain = Plain()
        self.addCleanup(plain.getHandle().close)
        self.assertEqual(tls.tls_session_info(Plain()), (None, None))
        self.assertEqual(tls.tls_session_info(object()), (None, None))
        self.assertEqual(tls.tls_session_info(None), (None, None))

    def test_before_handshake(self):
        from OpenSSL import SSL

        class Fake:
            def getHandle(self):
                return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)

        self.assertEqual(tls.tls_session_info(Fake()), (None, None))
