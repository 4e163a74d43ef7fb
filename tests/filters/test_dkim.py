"""
Tests for mailgate.filters.dkim: every DKIM-Signature verified with dkimpy, keys looked up through
the DNS bridge on the loopback DNS server.  The keys (RSA 2048, Ed25519) are made here and the
messages signed with dkimpy.
"""

import email
import email.policy

import dkim
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from mailgate.config import DNSConfig
from mailgate.filters.dnsbridge import DNSBridge
from mailgate.filters import dkim as dkim_filter
from mailgate.filters.dkim import DKIMFilter
from mailgate.message import Message
from mailgate.verdict import AuthResult
from tests.dnsserver import TestDNS
from tests.filters.test_dnsbridge import FakeSession, forbid_system_dns, run_in_thread, serve
from tests.dkimkeys import key_record as record, private

MESSAGE = (
    b"From: Alice <alice@signer.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: lunch?\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <m1@signer.test>\r\n"
    b"\r\n"
    b"Noon at the usual place.\r\n"
)

_keys = {}


def keys():
    """One RSA 2048 and one Ed25519 key for the whole module (RSA generation is slow)."""
    if not _keys:
        _keys["rsa"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _keys["ed25519"] = ed25519.Ed25519PrivateKey.generate()
        _keys["other"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _keys


def sign(message, key, selector=b"rsa", domain=b"signer.test", algorithm=b"rsa-sha256", **kw):
    """message with a DKIM-Signature (made by dkimpy) in front."""
    header = dkim.sign(message, selector, domain, private(key), signature_algorithm=algorithm,
                       linesep=b"\r\n", **kw)
    return header + message


def dkim_zone():
    k = keys()
    zone = TestDNS()
    zone.add("rsa._domainkey.signer.test", "TXT", record(k["rsa"]))
    zone.add("ed._domainkey.signer.test", "TXT", record(k["ed25519"]))
    zone.add("rsa._domainkey.other.test", "TXT", record(k["other"]))
    zone.add("revoked._domainkey.signer.test", "TXT", "v=DKIM1; k=rsa; p=")
    zone.add("garbage._domainkey.signer.test", "TXT", "v=DKIM1; k=rsa; p=bm90IGEga2V5")
    zone.add("unknown._domainkey.signer.test", "TXT", "v=DKIM1; k=dsa; p=AAAA")
    zone.hang("slow._domainkey.signer.test")
    zone.fail("broken._domainkey.signer.test", "SERVFAIL")
    return zone


def message(raw):
    return Message(None, raw, email.message_from_bytes(raw, policy=email.policy.default))


class DKIMFilterTests(TestCase):
    def setUp(self):
        forbid_system_dns(self)
        self.zone = dkim_zone()
        resolver = serve(self, self.zone, timeout=0.3)
        self.filter = DKIMFilter(DNSBridge(reactor, resolver, timeout=5), run_in_thread, timeout=5)

    @defer.inlineCallbacks
    def verify(self, raw):
        session = FakeSession()
        verdict = yield self.filter.on_data(session, message(raw))
        self.assertEqual(verdict.action, "next")  # DKIM never decides
        return session

    @defer.inlineCallbacks
    def assertResults(self, raw, *expected):
        session = yield self.verify(raw)
        self.assertEqual([d["result"] for d in session.transaction["dkim"]], list(expected),
                         session.transaction["dkim"])
        self.assertEqual([a.result for a in session.auth_results], list(expected) or ["none"])
        return session

    @defer.inlineCallbacks
    def test_rsa_pass(self):
        raw = sign(MESSAGE, keys()["rsa"])
        session = yield self.assertResults(raw, "pass")
        b = dkim.util.parse_tag_value(raw.split(b"\r\n\r\n")[0].split(b":", 1)[1])[b"b"]
        b8 = b"".join(b.split())[:8].decode("ascii")
        self.assertEqual(session.transaction["dkim"], [{
            "result": "pass", "domain": "signer.test", "selector": "rsa",
            "algorithm": "rsa-sha256", "identity": "@signer.test", "b": b8, "reason": None,
        }])
        self.assertEqual(session.auth_results, [AuthResult("dkim", "pass", None, [
            ("header.d", "signer.test"), ("header.i", "@signer.test"), ("header.s", "rsa"),
            ("header.a", "rsa-sha256"), ("header.b", b8),
        ])])
        self.assertEqual(self.zone.count("rsa._domainkey.signer.test", "TXT"), 1)

    @defer.inlineCallbacks
    def test_ed25519_pass(self):
        """RFC 8463 ed25519-sha256."""
        raw = sign(MESSAGE, keys()["ed25519"], selector=b"ed", algorithm=b"ed25519-sha256")
        session = yield self.assertResults(raw, "pass")
        self.assertEqual(session.transaction["dkim"][0]["algorithm"], "ed25519-sha256")
        self.assertIn(("header.a", "ed25519-sha256"), session.auth_results[0].properties)

    @defer.inlineCallbacks
    def test_identity(self):
        raw = sign(MESSAGE, keys()["rsa"], identity=b"alice@mail.signer.test")
        session = yield self.assertResults(raw, "pass")
        self.assertEqual(session.transaction["dkim"][0]["identity"], "alice@mail.signer.test")
        self.assertEqual(session.auth_results[0].properties[1],
                         ("header.i", "alice@mail.signer.test"))

    @defer.inlineCallbacks
    def test_body_tampered(self):
        raw = sign(MESSAGE, keys()["rsa"]).replace(b"Noon", b"Midnight")
        session = yield self.assertResults(raw, "fail")
        self.assertEqual(session.transaction["dkim"][0]["reason"], "body hash mismatch")
        self.assertEqual(session.auth_results[0].reason, "body hash mismatch")
        self.assertIn(("header.d", "signer.test"), session.auth_results[0].properties)

    @defer.inlineCallbacks
    def test_header_tampered(self):
        raw = sign(MESSAGE, keys()["ed25519"], selector=b"ed", algorithm=b"ed25519-sha256")
        session = yield self.assertResults(raw.replace(b"lunch?", b"dinner?"), "fail")
        self.assertEqual(session.transaction["dkim"][0]["reason"], "signature did not verify")
        raw = sign(MESSAGE, keys()["rsa"])
        yield self.assertResults(raw.replace(b"lunch?", b"dinner?"), "fail")

    @defer.inlineCallbacks
    def test_wrong_key(self):
        """Signed with another key than the one published: fail."""
        raw = sign(MESSAGE, keys()["other"])
        yield self.assertResults(raw, "fail")

    @defer.inlineCallbacks
    def test_missing_key(self):
        raw = sign(MESSAGE, keys()["rsa"], selector=b"missing")
        session = yield self.assertResults(raw, "permerror")
        self.assertEqual(session.transaction["dkim"][0]["reason"], "no key for signature")
        self.assertIn(("header.s", "missing"), session.auth_results[0].properties)

    @defer.inlineCallbacks
    def test_unusable_keys(self):
        for selector in (b"revoked", b"garbage", b"unknown"):
            raw = sign(MESSAGE, keys()["rsa"], selector=selector)
            session = yield self.assertResults(raw, "permerror")
            self.assertTrue(session.transaction["dkim"][0]["reason"].startswith("key not usable"))

    @defer.inlineCallbacks
    def test_small_rsa_key(self):
        """RSA keys under minkey bits (RFC 8301: 1024) are not valid: permerror."""
        self.filter.minkey = 4096
        session = yield self.assertResults(sign(MESSAGE, keys()["rsa"]), "permerror")
        self.assertIn("too small", session.transaction["dkim"][0]["reason"])

    @defer.inlineCallbacks
    def test_key_lookup_timeout(self):
        """A name server that does not answer (or fails): temperror, not fail."""
        for selector in (b"slow", b"broken"):
            raw = sign(MESSAGE, keys()["rsa"], selector=selector)
            session = yield self.assertResults(raw, "temperror")
            self.assertIn("key lookup failed", session.transaction["dkim"][0]["reason"])

    @defer.inlineCallbacks
    def test_two_signatures(self):
        """Every signature is verified and recorded, in header order (topmost first)."""
        good = sign(MESSAGE, keys()["rsa"])
        both = sign(good, keys()["other"], domain=b"other.test")
        session = yield self.assertResults(both, "pass", "pass")
        self.assertEqual([d["domain"] for d in session.transaction["dkim"]],
                         ["other.test", "signer.test"])
        session = yield self.assertResults(sign(good, keys()["rsa"], selector=b"missing"),
                                           "permerror", "pass")
        self.assertEqual([d["selector"] for d in session.transaction["dkim"]], ["missing", "rsa"])

    @defer.inlineCallbacks
    def test_one_good_one_bad(self):
        """A header only the Ed25519 signature covers is changed: it fails, the RSA one passes."""
        raw = sign(MESSAGE, keys()["rsa"], include_headers=[b"from", b"subject"])
        raw = sign(raw, keys()["ed25519"], selector=b"ed", algorithm=b"ed25519-sha256",
                   include_headers=[b"from", b"to"])
        session = yield self.assertResults(raw, "pass", "pass")
        session = yield self.assertResults(raw.replace(b"To: Bob", b"To: Eve"), "fail", "pass")
        self.assertEqual([(a.result, a.properties[2]) for a in session.auth_results],
                         [("fail", ("header.s", "ed")), ("pass", ("header.s", "rsa"))])

    @defer.inlineCallbacks
    def test_no_signature(self):
        session = yield self.assertResults(MESSAGE)
        self.assertEqual(session.transaction["dkim"], [])
        self.assertEqual(session.auth_results, [AuthResult("dkim", "none")])
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_rsa_sha1_not_accepted(self):
        """RFC 8301: rsa-sha1 signatures are not valid: policy, and no key lookup."""
        raw = sign(MESSAGE, keys()["rsa"], algorithm=b"rsa-sha1")
        session = yield self.assertResults(raw, "policy")
        self.assertIn("rsa-sha1", session.transaction["dkim"][0]["reason"])
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_unusable_signatures(self):
        """A signature field that cannot be used: neutral, without a key lookup."""
        raw = sign(MESSAGE, keys()["rsa"])
        cases = [
            b"DKIM-Signature: garbage\r\n" + MESSAGE,
            b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; s=rsa\r\n" + MESSAGE,  # no b=
            _without_from(raw),  # RFC 6376 6.1.1: From must be signed
            raw.replace(b"v=1;", b"v=2;", 1),
            raw.replace(b"a=rsa-sha256", b"a=rsa-md5", 1),
            raw.replace(b"i=@signer.test", b"i=@elsewhere.test", 1),  # i= outside d=
        ]
        for case in cases:
            self.zone.queries.clear()
            yield self.assertResults(case, "neutral")
            self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_too_many_signatures(self):
        """At most max_signatures are verified (the topmost); the rest are left out."""
        raw = MESSAGE
        for _ in range(5):
            raw = sign(raw, keys()["rsa"], selector=b"missing")
        self.filter.max_signatures = 3
        yield self.assertResults(raw, "permerror", "permerror", "permerror")
        self.assertEqual(self.zone.count("missing._domainkey.signer.test"), 1)  # then cached

    @defer.inlineCallbacks
    def test_unexpected_error_is_temperror(self):
        def broken(*args, **kwargs):
            raise ZeroDivisionError()

        self.patch(dkim.DKIM, "verify", broken)
        session = yield self.assertResults(sign(MESSAGE, keys()["rsa"]), "temperror")
        self.assertEqual(session.transaction["dkim"][0]["domain"], "signer.test")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_make(self):
        class Config:
            dns = DNSConfig(timeout=3.0)

        resolver = object()
        context = {"config": Config(), "reactor": reactor, "resolver": resolver,
                   "run_in_thread": run_in_thread}
        filter = dkim_filter.make(context)
        self.assertEqual(filter.name, "dkim")
        self.assertIs(filter.bridge.resolver, resolver)
        self.assertEqual(filter.timeout, 4.0)


def _without_from(raw):
    """raw with its first signature's h= no longer naming From (the signature is unusable)."""
    header, rest = raw.split(b"\r\n\r\n", 1)
    start = header.index(b"h=")
    end = header.index(b";", start)
    names = [n for n in header[start + 2:end].replace(b"\r\n", b"").replace(b" ", b"").split(b":")
             if n.lower() != b"from"]
    return header[:start] + b"h=" + b":".join(names) + header[end:] + b"\r\n\r\n" + rest
