"""
Certificate-based relay (mailgate.smtp.clientcert): which client certificates let a session
relay, checked on certificates from the test CA; the TLS handshake itself is tested end to end
(tests/e2e/test_exchange.py).
"""

import time

from OpenSSL import crypto
from twisted.trial import unittest

from mailgate.smtp.clientcert import ClientCertificates, permitted
from tests.smtphelp import Session, listener
from tests.tlsutil import make_ca


class FakeHandle:
    def __init__(self, cert_path):
        if cert_path is None:
            self.chain = []
        else:
            with open(cert_path, "rb") as f:
                data = f.read()
            from cryptography import x509

            self.chain = [crypto.X509.from_cryptography(c)
                          for c in x509.load_pem_x509_certificates(data)]

    def get_peer_certificate(self):
        return self.chain[0] if self.chain else None

    def get_peer_cert_chain(self):
        return self.chain[1:]  # as a server sees it: without the leaf


class FakeTransport:
    def __init__(self, cert_path):
        self.handle = FakeHandle(cert_path)

    def getHandle(self):
        return self.handle


class ClientCertificateTests(unittest.TestCase):
    def setUp(self):
        root = self.mktemp()
        self.ca = make_ca(root + "/ca")
        self.other = make_ca(root + "/other")
        self.certs = ClientCertificates(("mail.protection.outlook.test",), self.ca.ca_path)
        self.root = root

    def name(self, cert_path, now=None):
        return self.certs.name(FakeTransport(cert_path), now or time.time())

    def test_trusted_and_named(self):
        cert, _ = self.ca.issue("Mail.Protection.Outlook.test", self.root + "/a")
        self.assertEqual(self.name(cert), "mail.protection.outlook.test")

    def test_untrusted_expired_unnamed_or_absent(self):
        cert, _ = self.other.issue("mail.protection.outlook.test", self.root + "/b")
        self.assertIsNone(self.name(cert))
        cert, _ = self.ca.issue("mail.protection.outlook.test", self.root + "/c", expired=True)
        self.assertIsNone(self.name(cert))
        cert, _ = self.ca.issue("other.outlook.test", self.root + "/d")
        self.assertIsNone(self.name(cert))
        self.assertIsNone(self.name(None))
        cert, _ = self.ca.issue("mail.protection.outlook.test", self.root + "/e")
        self.assertIsNone(self.name(cert, now=time.time() + 365 * 86400))  # not valid by then

    def test_session_without_tls_or_without_the_key_is_not_asked(self):
        s = Session(listener())
        self.assertIsNone(permitted(s.proto))
        s.factory.client_certs = self.certs
        self.assertIsNone(permitted(s.proto))  # no TLS

    def test_relaying_with_a_permitted_certificate(self):
        cert, _ = self.ca.issue("mail.protection.outlook.test", self.root + "/f")
        from twisted.internet.task import Clock

        clock = Clock()
        clock.advance(time.time())  # certificates are checked at the reactor's time
        s = Session(listener(tls="optional", auth="none"), clock=clock)
        s.factory.client_certs = self.certs
        s.read()
        s.cmd("EHLO client.example")
        s.start_tls()
        s.transport.getHandle = FakeTransport(cert).getHandle
        s.cmd("MAIL FROM:<a@outlook.test>")
        self.assertEqual(s.cmd("RCPT TO:<x@elsewhere.example>"), "250 2.1.5 Ok\r\n")
        self.assertTrue(s.proto.session.relay_allowed)
        # A new TLS session (or none) proves nothing any more.
        s2 = Session(listener(tls="optional", auth="none"))
        s2.factory.client_certs = self.certs
        s2.read()
        s2.cmd("EHLO client.example")
        s2.cmd("MAIL FROM:<a@outlook.test>")
        self.assertTrue(s2.cmd("RCPT TO:<x@elsewhere.example>").startswith("554 5.7.1"))
