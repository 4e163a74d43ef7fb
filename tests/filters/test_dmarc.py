"""
Tests for mailgate.filters.dmarc: policy discovery on the loopback DNS server, alignment with the
SPF and DKIM results the other filters leave in session.transaction, pct sampling with a seeded
random, the verdicts; and, at the end, the three filters run one after the other.
"""

import email
import email.policy
import random

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate.config import DMARCConfig, SPFConfig
from mailgate.filters.dnsbridge import DNSBridge
from mailgate.filters import dmarc as dmarc_filter
from mailgate.filters.dkim import DKIMFilter
from mailgate.filters.dmarc import (
    DMARCFilter, DMARCRecordError, from_domains, organizational_domain, parse_record,
)
from mailgate.filters.spf import SPFFilter
from mailgate.message import Message
from mailgate.verdict import AuthResult
from tests.dnsserver import TestDNS
from tests.filters.test_dkim import MESSAGE, keys, record, sign
from tests.filters.test_dnsbridge import FakeSession, forbid_system_dns, run_in_thread, sender, serve


def dmarc_zone():
    zone = TestDNS()
    zone.add("_dmarc.reject.test", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@reject.test")
    zone.add("_dmarc.quarantine.test", "TXT", "v=DMARC1; p=quarantine")
    zone.add("_dmarc.none.test", "TXT", "v=DMARC1; p=none")
    zone.add("_dmarc.org.test", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    zone.add("_dmarc.own.org.test", "TXT", "v=DMARC1; p=none")
    zone.add("_dmarc.nosp.test", "TXT", "v=DMARC1; p=reject")
    zone.add("_dmarc.pct0.test", "TXT", "v=DMARC1; p=reject; pct=0")
    zone.add("_dmarc.pct100.test", "TXT", "v=DMARC1; p=reject; pct=100")
    zone.add("_dmarc.pct50.test", "TXT", "v=DMARC1; p=quarantine; pct=50")
    zone.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
    zone.add("_dmarc.badp.test", "TXT", "v=DMARC1; p=bogus")
    zone.add("_dmarc.badprua.test", "TXT", "v=DMARC1; p=bogus; rua=mailto:x@badprua.test")
    zone.add("_dmarc.twice.test", "TXT", "v=DMARC1; p=reject")
    zone.add("_dmarc.twice.test", "TXT", "v=DMARC1; p=none")
    zone.add("_dmarc.notdmarc.test", "TXT", "v=spf1 -all")
    zone.add("_dmarc.notdmarc.test", "TXT", "p=reject; v=DMARC1")  # v= must come first
    zone.add("_dmarc.split.test", "TXT", ["v=DMARC1; ", "p=reject"])
    zone.add("_dmarc.case.test", "TXT", "V = DMARC1 ; P = Reject ; ADKIM = S")
    zone.hang("_dmarc.slow.test")
    zone.fail("_dmarc.servfail.test", "SERVFAIL")
    return zone


def message(from_lines):
    """A message with the given From header fields (a str, or a list of them)."""
    if isinstance(from_lines, str):
        from_lines = [from_lines]
    raw = b"".join(b"From: " + line.encode("utf-8") + b"\r\n" for line in from_lines)
    raw += b"To: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
    return Message(None, raw, email.message_from_bytes(raw, policy=email.policy.default))


def session_with(spf=None, dkim=(), **kwargs):
    """A session as the SPF and DKIM filters leave it: spf=(result, domain), dkim=[(result, d)]."""
    session = FakeSession(**kwargs)
    if spf is not None:
        session.transaction["spf"] = {"result": spf[0], "domain": spf[1], "identity": "mailfrom"}
    session.transaction["dkim"] = [{"result": r, "domain": d} for r, d in dkim]
    return session


class DMARCFilterTests(TestCase):
    def setUp(self):
        forbid_system_dns(self)
        self.zone = dmarc_zone()
        self.resolver = serve(self, self.zone, timeout=0.3)

    def make(self, random=None, **config):
        return DMARCFilter(DMARCConfig(**config), self.resolver,
                           random=random or (lambda: 0.0))

    @defer.inlineCallbacks
    def evaluate(self, from_lines, spf=None, dkim=(), filter=None, **session):
        session = session_with(spf, dkim, **session)
        verdict = yield (filter or self.make()).on_data(session, message(from_lines))
        return session, verdict

    @defer.inlineCallbacks
    def assertDMARC(self, from_lines, result, spf=None, dkim=(), filter=None, **expected):
        session, verdict = yield self.evaluate(from_lines, spf, dkim, filter)
        outcome = session.transaction["dmarc"]
        self.assertEqual(outcome["result"], result, outcome)
        for key, value in expected.items():
            self.assertEqual(outcome[key], value, key)
        auth = [a for a in session.auth_results if a.method == "dmarc"]
        self.assertEqual(len(auth), 1)
        self.assertEqual(auth[0].result, result)
        return session, verdict, auth[0]

    # --- alignment --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_pass_spf_relaxed(self):
        session, verdict, auth = yield self.assertDMARC(
            "Alice <alice@reject.test>", "pass", spf=("pass", "bounce.reject.test"),
            spf_aligned=True, dkim_aligned=False, policy="reject", disposition="none",
            rua=("mailto:dmarc@reject.test",), record_domain="reject.test",
        )
        self.assertEqual(auth, AuthResult("dmarc", "pass", None, [
            ("header.from", "reject.test"), ("policy.dmarc", "reject")]))
        self.assertEqual(verdict.action, "next")

    @defer.inlineCallbacks
    def test_pass_dkim_relaxed(self):
        yield self.assertDMARC("a@reject.test", "pass", dkim=[("pass", "mail.reject.test")],
                               spf_aligned=False, dkim_aligned=True)
        yield self.assertDMARC("a@news.reject.test", "pass", dkim=[("pass", "reject.test")])
        yield self.assertDMARC("a@reject.test", "pass",
                               dkim=[("fail", "reject.test"), ("pass", "reject.test")])

    @defer.inlineCallbacks
    def test_not_aligned(self):
        for spf, dkim in [
            (("pass", "other.test"), [("pass", "other.test")]),  # authenticated, not aligned
            (("fail", "reject.test"), [("fail", "reject.test")]),  # aligned, not authenticated
            (("softfail", "reject.test"), [("neutral", "reject.test")]),
            (("pass", "reject.test.other.test"), [("pass", "test")]),
            (None, []),
        ]:
            yield self.assertDMARC("a@reject.test", "fail", spf=spf, dkim=dkim,
                                   spf_aligned=False, dkim_aligned=False)

    @defer.inlineCallbacks
    def test_strict(self):
        yield self.assertDMARC("a@strict.test", "fail", spf=("pass", "bounce.strict.test"),
                               dkim=[("pass", "mail.strict.test")])
        yield self.assertDMARC("a@strict.test", "pass", spf=("pass", "strict.test"))
        yield self.assertDMARC("a@strict.test", "pass", dkim=[("pass", "STRICT.test")])
        yield self.assertDMARC("a@sub.strict.test", "fail", dkim=[("pass", "strict.test")])
        # the same identities, relaxed
        yield self.assertDMARC("a@reject.test", "pass", spf=("pass", "bounce.reject.test"))

    @defer.inlineCallbacks
    def test_tags_case_insensitive(self):
        yield self.assertDMARC("a@case.test", "fail", dkim=[("pass", "x.case.test")],
                               policy="reject", adkim="s")
        yield self.assertDMARC("a@split.test", "fail", policy="reject")

    # --- policy discovery -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_org_domain_fallback(self):
        """A subdomain without a record: the organizational domain's, with its sp."""
        yield self.assertDMARC("a@sub.org.test", "fail", policy="quarantine",
                               record_domain="org.test", org_domain="org.test")
        self.assertEqual(self.zone.count("_dmarc.sub.org.test", "TXT"), 1)
        self.assertEqual(self.zone.count("_dmarc.org.test", "TXT"), 1)
        yield self.assertDMARC("a@org.test", "fail", policy="reject", record_domain="org.test")
        yield self.assertDMARC("a@deep.sub.nosp.test", "fail", policy="reject")  # no sp: p
        yield self.assertDMARC("a@own.org.test", "fail", policy="none",
                               record_domain="own.org.test")
        yield self.assertDMARC("a@deep.sub.org.test", "pass", spf=("pass", "org.test"),
                               policy="quarantine")

    @defer.inlineCallbacks
    def test_no_record(self):
        for domain in ("nodmarc.test", "sub.nodmarc.test", "notdmarc.test"):
            session, verdict, auth = yield self.assertDMARC(
                "a@" + domain, "none", filter=self.make(enforce=True), policy=None)
            self.assertEqual(auth.properties, (("header.from", domain),))
            self.assertEqual(verdict.action, "next")

    @defer.inlineCallbacks
    def test_permerror(self):
        for domain in ("badp.test", "twice.test"):
            session, verdict, auth = yield self.assertDMARC(
                "a@" + domain, "permerror", filter=self.make(enforce=True))
            self.assertTrue(auth.reason)
            self.assertEqual(verdict.action, "next")
        # a bad p= with a valid rua: as if p=none (RFC 7489 6.6.3)
        yield self.assertDMARC("a@badprua.test", "fail", policy="none")

    # --- verdicts ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_reject(self):
        _, verdict, _ = yield self.assertDMARC("a@reject.test", "fail", disposition="reject",
                                               filter=self.make(enforce=True))
        self.assertEqual(verdict.action, "reject")
        self.assertEqual((verdict.reply.code, verdict.reply.status), (550, "5.7.1"))
        self.assertEqual(verdict.reply.text, "Unauthenticated email from reject.test is not "
                         "accepted due to domain's DMARC policy")
        _, verdict, _ = yield self.assertDMARC("a@reject.test", "fail")  # not enforced
        self.assertEqual(verdict.action, "next")
        _, verdict, _ = yield self.assertDMARC("a@reject.test", "pass", spf=("pass", "reject.test"),
                                               filter=self.make(enforce=True))
        self.assertEqual(verdict.action, "next")

    @defer.inlineCallbacks
    def test_quarantine(self):
        _, verdict, _ = yield self.assertDMARC("a@quarantine.test", "fail",
                                               filter=self.make(enforce=True))
        self.assertEqual(verdict.action, "quarantine")
        self.assertIn("quarantine.test", verdict.reason)
        filter = self.make(enforce=True, quarantine_action="tag")
        _, verdict, _ = yield self.assertDMARC("a@quarantine.test", "fail", filter=filter)
        self.assertEqual(verdict.action, "next")
        self.assertEqual(verdict.headers, (("X-Mailgate-DMARC", "fail policy=quarantine"),))
        _, verdict, _ = yield self.assertDMARC("a@sub.org.test", "fail", filter=filter)
        self.assertEqual(verdict.headers, (("X-Mailgate-DMARC", "fail policy=quarantine"),))

    @defer.inlineCallbacks
    def test_policy_none(self):
        _, verdict, auth = yield self.assertDMARC("a@none.test", "fail",
                                                  filter=self.make(enforce=True))
        self.assertEqual(verdict.action, "next")
        self.assertEqual(verdict.headers, ())
        self.assertIn(("policy.dmarc", "none"), auth.properties)

    @defer.inlineCallbacks
    def test_pct(self):
        """pct=0: never sampled, the next milder policy; pct=100: always the policy."""
        filter = self.make(enforce=True, random=lambda: 0.0)
        _, verdict, _ = yield self.assertDMARC("a@pct0.test", "fail", filter=filter,
                                               policy="reject", disposition="quarantine", pct=0)
        self.assertEqual(verdict.action, "quarantine")
        filter = self.make(enforce=True, random=lambda: 0.999)
        _, verdict, _ = yield self.assertDMARC("a@pct100.test", "fail", filter=filter,
                                               disposition="reject")
        self.assertEqual(verdict.action, "reject")

    @defer.inlineCallbacks
    def test_pct_sampling_seeded(self):
        """pct=50 with a seeded random: the sampled messages are exactly the ones expected."""
        filter = self.make(enforce=True, random=random.Random(2024).random)
        same = random.Random(2024)
        expected = ["quarantine" if same.random() * 100 < 50 else "none" for _ in range(20)]
        got = []
        for _ in range(20):
            session, verdict, _ = yield self.assertDMARC("a@pct50.test", "fail", filter=filter)
            got.append(session.transaction["dmarc"]["disposition"])
            self.assertEqual(verdict.action, "quarantine" if got[-1] == "quarantine" else "next")
        self.assertEqual(got, expected)
        self.assertIn("none", got)
        self.assertIn("quarantine", got)

    @defer.inlineCallbacks
    def test_temperror(self):
        """The policy lookup fails (no answer, SERVFAIL): accepted and tagged, or 451."""
        for domain in ("slow.test", "sub.slow.test", "servfail.test"):
            _, verdict, auth = yield self.assertDMARC("a@" + domain, "temperror",
                                                      filter=self.make(enforce=True))
            self.assertEqual(verdict.action, "next")
            self.assertEqual(verdict.headers, (("X-Mailgate-DMARC", "temperror"),))
            self.assertIn("_dmarc.", auth.reason)
        filter = self.make(tempfail_on_error=True)
        _, verdict, _ = yield self.assertDMARC("a@slow.test", "temperror", filter=filter)
        self.assertEqual(verdict.action, "tempfail")
        self.assertEqual((verdict.reply.code, verdict.reply.status), (451, "4.7.1"))

    @defer.inlineCallbacks
    def test_temperror_from_aligned_identifier(self):
        """SPF or DKIM could not finish for an aligned domain: temperror, not a reject."""
        filter = self.make(enforce=True, tempfail_on_error=True)
        _, verdict, auth = yield self.assertDMARC("a@reject.test", "temperror", filter=filter,
                                                  spf=("temperror", "reject.test"))
        self.assertEqual(verdict.action, "tempfail")
        self.assertIn("SPF", auth.reason)
        yield self.assertDMARC("a@reject.test", "temperror", dkim=[("temperror", "reject.test")])
        # an unaligned temperror changes nothing; a pass still wins
        yield self.assertDMARC("a@reject.test", "fail", dkim=[("temperror", "other.test")])
        yield self.assertDMARC("a@reject.test", "pass", spf=("temperror", "reject.test"),
                               dkim=[("pass", "reject.test")])

    # --- the From header field ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bad_from(self):
        """Missing, duplicated, several addresses, no domain: fail, saying why; never a crash."""
        cases = [
            ([], "no From header field"),
            (["a@none.test", "b@none.test"], "2 From header fields"),
            ("a@none.test, b@none.test", "2 addresses in the From header field"),
            ("just a name", "no valid domain in the From header field"),
            ("a@[192.0.2.1]", "no valid domain in the From header field"),
            ("undisclosed-recipients:;", "no address in the From header field"),
            ("<<<@>>>", "no valid domain in the From header field"),
        ]
        for from_lines, why in cases:
            _, verdict, auth = yield self.assertDMARC(from_lines, "fail",
                                                      filter=self.make(enforce=True))
            self.assertEqual(auth.reason, why)
            self.assertEqual(verdict.action, "next")  # p=none or no domain at all
            self.assertFalse([p for p in auth.properties if p[0] == "header.from"])

    @defer.inlineCallbacks
    def test_second_from_cannot_hide_a_domain(self):
        """Several From domains: the strictest of their policies applies (RFC 7489 6.6.1)."""
        filter = self.make(enforce=True)
        for from_lines in (["a@none.test", "b@reject.test"], "a@none.test, b@reject.test"):
            _, verdict, auth = yield self.assertDMARC(from_lines, "fail", filter=filter,
                                                      spf=("pass", "none.test"),
                                                      policy="reject", disposition="reject")
            self.assertEqual(verdict.action, "reject")
            self.assertIn("none.test, reject.test", verdict.reply.text)
            self.assertEqual(auth.properties, (("policy.dmarc", "reject"),))

    @defer.inlineCallbacks
    def test_idn_from(self):
        self.zone.add("_dmarc.xn--bcher-kva.test", "TXT", "v=DMARC1; p=reject")
        yield self.assertDMARC("a@b\xfccher.test", "pass", dkim=[("pass", "xn--bcher-kva.test")],
                               domain="xn--bcher-kva.test")

    # --- when it runs -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_internal_sessions(self):
        filter = self.make(enforce=True)
        session, verdict = yield self.evaluate("a@reject.test", filter=filter, relay_allowed=True)
        self.assertEqual(verdict.action, "next")
        self.assertNotIn("dmarc", session.transaction)
        self.assertEqual(self.zone.queries, [])
        filter = self.make(enforce=True, check_internal=True)
        session, verdict = yield self.evaluate("a@reject.test", filter=filter, relay_allowed=True)
        self.assertEqual(verdict.action, "reject")

    def test_make(self):
        class Config:
            dmarc = DMARCConfig(enforce=True)

        chosen = random.Random(1).random
        context = {"config": Config(), "reactor": reactor, "resolver": self.resolver,
                   "run_in_thread": run_in_thread, "random": chosen}
        filter = dmarc_filter.make(context)
        self.assertEqual((filter.name, filter.config), ("dmarc", Config.dmarc))
        self.assertIs(filter.resolver, self.resolver)
        self.assertIs(filter.random, chosen)
        del context["random"]
        self.assertIs(dmarc_filter.make(context).random, random.random)


class PartsTests(SynchronousTestCase):
    def test_organizational_domain(self):
        """The bundled Public Suffix List, .test and other unknown TLDs as suffixes."""
        self.assertEqual(organizational_domain("a.b.example.test"), "example.test")
        self.assertEqual(organizational_domain("example.test"), "example.test")
        self.assertEqual(organizational_domain("test"), "test")
        self.assertEqual(organizational_domain("mail.example.co.uk"), "example.co.uk")
        self.assertEqual(organizational_domain("a.b.example.com"), "example.com")
        self.assertEqual(organizational_domain("x.y.alice.github.io"), "alice.github.io")
        self.assertNotEqual(organizational_domain("a.example.test"),
                            organizational_domain("a.other.test"))

    def test_parse_record(self):
        r = parse_record("v=DMARC1; p=Quarantine; sp=reject; pct=25; adkim=s; aspf=r; "
                         "rua=mailto:a@x.test,mailto:b@x.test!10m, bogus; ruf=mailto:f@x.test; "
                         "fo=1; future=1")
        self.assertEqual((r.p, r.sp, r.pct, r.adkim, r.aspf),
                         ("quarantine", "reject", 25, "s", "r"))
        self.assertEqual(r.rua, ("mailto:a@x.test", "mailto:b@x.test!10m"))
        r = parse_record("v=DMARC1;p=reject;pct=250;adkim=x;aspf=")  # bad values: defaults
        self.assertEqual((r.p, r.sp, r.pct, r.adkim, r.aspf), ("reject", None, 100, "r", "r"))
        self.assertEqual(parse_record("v=DMARC1; p=reject; pct=0").pct, 0)
        for text in ("v=DMARC1", "v=DMARC1; p=", "v=DMARC1; p=reject; sp=maybe", "v=dmarc1; p=none",
                     "p=none; v=DMARC1"):
            self.assertRaises(DMARCRecordError, parse_record, text)
        r = parse_record("v=DMARC1; sp=maybe; p=reject; rua=mailto:a@x.test")
        self.assertEqual((r.p, r.sp), ("none", None))

    def test_from_domains(self):
        self.assertEqual(from_domains(b"From: A <a@Example.TEST>\r\n\r\nbody"),
                         (["example.test"], None))
        self.assertEqual(from_domains(b"\r\nFrom: a@x.test\r\n\r\n"), ([], "no From header field"))
        self.assertEqual(from_domains(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n"),
                         (["x.test"], "2 From header fields"))
        self.assertEqual(from_domains(b"From: =?utf-8?q?J=C3=B6?= <j@b\xc3\xbccher.test>\r\n\r\n"),
                         (["xn--bcher-kva.test"], None))


# --- the three filters together, as the chain runs them ------------------------------------------


class TogetherTests(TestCase):
    """SPF at MAIL FROM, then DKIM and DMARC at end of data, on one session, all on loopback DNS."""

    def setUp(self):
        forbid_system_dns(self)
        zone = TestDNS()
        zone.add("signer.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
        zone.add("rsa._domainkey.signer.test", "TXT", record(keys()["rsa"]))
        zone.add("_dmarc.signer.test", "TXT", "v=DMARC1; p=reject")
        zone.add("bounces.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
        resolver = serve(self, zone, timeout=0.3)
        bridge = DNSBridge(reactor, resolver, timeout=5)
        self.filters = [
            SPFFilter(SPFConfig(), bridge, run_in_thread, hostname="gw.test"),
            DKIMFilter(bridge, run_in_thread),
            DMARCFilter(DMARCConfig(enforce=True), resolver),
        ]

    @defer.inlineCallbacks
    def deliver(self, client_ip, mail_from, raw):
        session = FakeSession(client_ip=client_ip)
        spf, dkim, dmarc = self.filters
        verdicts = [(yield spf.on_mail(session, sender(mail_from)))]
        msg = Message(None, raw, email.message_from_bytes(raw, policy=email.policy.default))
        verdicts.append((yield dkim.on_data(session, msg)))
        verdicts.append((yield dmarc.on_data(session, msg)))
        return session, [v.action for v in verdicts]

    @defer.inlineCallbacks
    def test_signed_from_a_third_party(self):
        """SPF passes for another domain; the aligned DKIM signature makes DMARC pass."""
        session, actions = yield self.deliver("198.51.100.7", "x@bounces.test",
                                          sign(MESSAGE, keys()["rsa"]))
        self.assertEqual(actions, ["next", "next", "next"])
        self.assertEqual([(a.method, a.result) for a in session.auth_results],
                         [("spf", "fail"), ("dkim", "pass"), ("dmarc", "pass")])

    @defer.inlineCallbacks
    def test_spf_alone(self):
        session, actions = yield self.deliver("192.0.2.10", "x@signer.test", MESSAGE)
        self.assertEqual(actions, ["next", "next", "next"])
        self.assertEqual([(a.method, a.result) for a in session.auth_results],
                         [("spf", "pass"), ("dkim", "none"), ("dmarc", "pass")])

    @defer.inlineCallbacks
    def test_forged(self):
        """Neither aligned: the domain's p=reject is applied."""
        tampered = sign(MESSAGE, keys()["rsa"]).replace(b"Noon", b"Pay now")
        session, actions = yield self.deliver("198.51.100.7", "x@bounces.test", tampered)
        self.assertEqual(actions, ["next", "next", "reject"])
        self.assertEqual([(a.method, a.result) for a in session.auth_results],
                         [("spf", "fail"), ("dkim", "fail"), ("dmarc", "fail")])
