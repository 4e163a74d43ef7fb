"""
Tests for mailgate.filters.spf: pyspf through the DNS bridge, against the loopback DNS server.

The client is 192.0.2.10 unless a test says otherwise; every zone lives under .test.
"""

from twisted.internet import defer, reactor
from twisted.names import common
from twisted.trial.unittest import TestCase

from mailgate.config import DNSConfig, SPFConfig
from mailgate.filters.dnsbridge import DNSBridge
from mailgate.filters import spf as spf_filter
from mailgate.filters.spf import SPFFilter
from mailgate.verdict import AuthResult
from tests.dnsserver import TestDNS
from tests.filters.test_dnsbridge import FakeSession, forbid_system_dns, run_in_thread, sender, serve

CLIENT = "192.0.2.10"


def spf_zone():
    zone = TestDNS()
    zone.add("pass.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.add("pass.test", "TXT", "google-site-verification=abc")  # not SPF: ignored
    zone.add("fail.test", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    zone.add("softfail.test", "TXT", "v=spf1 ip4:198.51.100.0/24 ~all")
    zone.add("neutral.test", "TXT", "v=spf1 ?all")
    zone.add("none.test", "A", "192.0.2.99")  # exists, no SPF record
    zone.add("syntax.test", "TXT", "v=spf1 ip4:192.0.2.0/24 bogus -all")
    zone.add("two.test", "TXT", "v=spf1 -all")
    zone.add("two.test", "TXT", "v=spf1 +all")
    zone.add("explained.test", "TXT", "v=spf1 -all exp=why.explained.test")
    zone.add("why.explained.test", "TXT", "%{i} is not a mail server of %{d}")
    zone.add("mx.test", "TXT", "v=spf1 mx -all")
    zone.add("mx.test", "MX", (10, "mail.mx.test"))
    zone.add("mail.mx.test", "A", CLIENT)
    zone.add("a.test", "TXT", "v=spf1 a:host.a.test -all")
    zone.add("host.a.test", "CNAME", "real.a.test")
    zone.add("real.a.test", "A", CLIENT)
    zone.add("ptr.test", "TXT", "v=spf1 ptr -all")
    zone.add("10.2.0.192.in-addr.arpa", "PTR", "mail.ptr.test")
    zone.add("mail.ptr.test", "A", CLIENT)
    zone.add("six.test", "TXT", "v=spf1 ip6:2001:db8::/32 -all")
    zone.add("redirect.test", "TXT", "v=spf1 redirect=pass.test")
    zone.add("helo.sender.test", "TXT", "v=spf1 a -all")
    zone.add("helo.sender.test", "A", CLIENT)
    # the DNS lookup limit: a chain of n includes, the last one authorizing the client
    for n in (10, 11):
        for k in range(n):
            zone.add("c%d-%d.test" % (n, k), "TXT", "v=spf1 include:c%d-%d.test -all" % (n, k + 1))
        zone.add("c%d-%d.test" % (n, n), "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    # the void lookup limit: two names that do not exist are allowed, three are not
    zone.add("void2.test", "TXT", "v=spf1 a:nx1.void2.test a:nx2.void2.test ip4:192.0.2.0/24 -all")
    zone.add("void3.test", "TXT",
             "v=spf1 a:nx1.void3.test mx:nx2.void3.test a:nx3.void3.test ip4:192.0.2.0/24 -all")
    zone.hang("slow.test")
    zone.add("slowinclude.test", "TXT", "v=spf1 include:slow.test -all")
    zone.fail("servfail.test", "SERVFAIL")
    return zone


class SPFFilterTests(TestCase):
    def setUp(self):
        forbid_system_dns(self)
        self.zone = spf_zone()
        self.resolver = serve(self, self.zone, timeout=0.3)
        # the resolver gives up first (0.3 s); the bridge's own bound is the backstop
        self.bridge = DNSBridge(reactor, self.resolver, timeout=5)

    def make(self, **config):
        return SPFFilter(SPFConfig(**config), self.bridge, run_in_thread, hostname="gw.test")

    @defer.inlineCallbacks
    def check(self, mail_from, filter=None, **session):
        session = FakeSession(**dict({"client_ip": CLIENT}, **session))
        verdict = yield (filter or self.make()).on_mail(session, sender(mail_from))
        return session, verdict

    @defer.inlineCallbacks
    def assertResult(self, mail_from, result, **session):
        session, verdict = yield self.check(mail_from, **session)
        self.assertEqual(session.transaction["spf"]["result"], result,
                         session.transaction["spf"])
        self.assertEqual(verdict.action, "next")
        return session

    @defer.inlineCallbacks
    def test_pass(self):
        session = yield self.assertResult("alice@pass.test", "pass")
        self.assertEqual(session.transaction["spf"], {
            "result": "pass", "domain": "pass.test", "identity": "mailfrom",
            "client_ip": CLIENT, "reason": None, "explanation": "sender SPF authorized",
        })
        self.assertEqual(session.auth_results,
                         [AuthResult("spf", "pass", None, [("smtp.mailfrom", "pass.test")])])
        self.assertEqual(self.zone.count("pass.test", "TXT"), 1)

    @defer.inlineCallbacks
    def test_results(self):
        for domain, result in [
            ("fail.test", "fail"), ("softfail.test", "softfail"), ("neutral.test", "neutral"),
            ("none.test", "none"), ("nowhere.test", "none"), ("syntax.test", "permerror"),
            ("two.test", "permerror"), ("servfail.test", "temperror"),
        ]:
            session = yield self.assertResult("bob@" + domain, result)
            self.assertEqual(session.auth_results[0].result, result)
            self.assertEqual(session.auth_results[0].properties, (("smtp.mailfrom", domain),))

    @defer.inlineCallbacks
    def test_mechanisms(self):
        """mx, a (through a CNAME), ptr, ip6 and redirect, answered through the bridge."""
        for domain in ("mx.test", "a.test", "ptr.test", "redirect.test"):
            yield self.assertResult("x@" + domain, "pass")
        yield self.assertResult("x@six.test", "pass", client_ip="2001:db8::25")
        yield self.assertResult("x@six.test", "fail", client_ip="2001:db9::25")
        yield self.assertResult("x@pass.test", "pass", client_ip="::ffff:192.0.2.10")

    @defer.inlineCallbacks
    def test_permerror_reasons(self):
        session = yield self.assertResult("x@syntax.test", "permerror")
        self.assertIn("bogus", session.transaction["spf"]["reason"])
        self.assertEqual(session.auth_results[0].reason, session.transaction["spf"]["reason"])

    @defer.inlineCallbacks
    def test_lookup_limit(self):
        """Ten DNS-querying terms are allowed; the eleventh include is a permerror."""
        yield self.assertResult("x@c10-0.test", "pass")
        session = yield self.assertResult("x@c11-0.test", "permerror")
        self.assertIn("Too many DNS lookups", session.transaction["spf"]["reason"])
        self.assertEqual(self.zone.count("c11-11.test"), 0)  # never asked: stopped at the limit

    @defer.inlineCallbacks
    def test_void_lookup_limit(self):
        yield self.assertResult("x@void2.test", "pass")
        session = yield self.assertResult("x@void3.test", "permerror")
        self.assertIn("Void lookup limit of 2 exceeded", session.transaction["spf"]["reason"])

    @defer.inlineCallbacks
    def test_limits_do_not_depend_on_pyspf_globals(self):
        import spf

        self.patch(spf, "MAX_LOOKUP", 100)
        self.patch(spf, "MAX_VOID_LOOKUPS", 100)
        yield self.assertResult("x@c11-0.test", "permerror")
        yield self.assertResult("x@void3.test", "permerror")

    @defer.inlineCallbacks
    def test_temperror_timeout(self):
        """A name server that does not answer: temperror once the lookup times out."""
        for domain in ("slow.test", "slowinclude.test"):
            session = yield self.assertResult("x@" + domain, "temperror")
            self.assertIn("timeout", session.transaction["spf"]["reason"])

    @defer.inlineCallbacks
    def test_whole_check_budget(self):
        """The check as a whole is bounded (RFC 7208 4.6.4), not only each lookup."""
        pending = []

        class Waiting(common.ResolverBase):  # a resolver that would wait for ever
            def _lookup(self, name, cls, type, timeout):
                d = defer.Deferred(lambda d: pending.remove(d))
                pending.append(d)
                return d

        filter = SPFFilter(SPFConfig(), DNSBridge(reactor, Waiting(), timeout=30),
                           run_in_thread, budget=0.2)
        session, _ = yield self.check("x@pass.test", filter=filter)
        self.assertEqual(session.transaction["spf"]["result"], "temperror")
        self.assertEqual(pending, [])

    @defer.inlineCallbacks
    def test_helo_identity_for_null_sender(self):
        session = yield self.assertResult("", "pass", helo="helo.sender.test")
        self.assertEqual(session.transaction["spf"]["identity"], "helo")
        self.assertEqual(session.transaction["spf"]["domain"], "helo.sender.test")
        self.assertEqual(session.auth_results,
                         [AuthResult("spf", "pass", None, [("smtp.helo", "helo.sender.test")])])
        session = yield self.assertResult("", "fail", helo="fail.test")
        self.assertEqual(session.auth_results[0].properties, (("smtp.helo", "fail.test"),))

    @defer.inlineCallbacks
    def test_no_domain_to_check(self):
        """An address literal or a one-label name: none, without asking DNS."""
        asked = len(self.zone.queries)
        yield self.assertResult("", "none", helo="[192.0.2.10]")
        yield self.assertResult("", "none", helo="localhost")
        session = yield self.assertResult("x@[192.0.2.10]", "none")
        self.assertIn("no domain", session.transaction["spf"]["reason"])
        self.assertEqual(len(self.zone.queries), asked)

    @defer.inlineCallbacks
    def test_internal_sessions(self):
        """relay_allowed sessions are skipped (nothing recorded) unless check_internal."""
        session, verdict = yield self.check("x@fail.test", filter=self.make(reject_fail=True),
                                            relay_allowed=True)
        self.assertEqual(verdict.action, "next")
        self.assertEqual(session.transaction, {})
        filter = self.make(reject_fail=True, check_internal=True)
        session, verdict = yield self.check("x@fail.test", filter=filter, relay_allowed=True)
        self.assertEqual(verdict.action, "reject")
        self.assertEqual(session.transaction["spf"]["result"], "fail")

    @defer.inlineCallbacks
    def test_reject_fail(self):
        session, verdict = yield self.check("x@fail.test", filter=self.make(reject_fail=True))
        self.assertEqual(verdict.action, "reject")
        self.assertEqual((verdict.reply.code, verdict.reply.status), (550, "5.7.23"))
        self.assertTrue(verdict.reply.text.startswith("SPF validation failed: "))
        self.assertIn("fail.test", verdict.reply.text)
        self.assertEqual(session.auth_results[0].result, "fail")
        for domain in ("softfail.test", "neutral.test", "pass.test", "none.test"):
            _, verdict = yield self.check("x@" + domain, filter=self.make(reject_fail=True))
            self.assertEqual(verdict.action, "next", domain)

    @defer.inlineCallbacks
    def test_reject_fail_explanation(self):
        """The domain's exp= text (macros expanded) is passed on, made printable."""
        _, verdict = yield self.check("x@explained.test", filter=self.make(reject_fail=True))
        self.assertIn("(192.0.2.10 is not a mail server of explained.test)", verdict.reply.text)

    @defer.inlineCallbacks
    def test_fail_not_rejected_by_default(self):
        session, verdict = yield self.check("x@fail.test")
        self.assertEqual(verdict.action, "next")
        self.assertEqual(session.auth_results[0].result, "fail")

    @defer.inlineCallbacks
    def test_tempfail_on_error(self):
        filter = self.make(tempfail_on_error=True)
        session, verdict = yield self.check("x@servfail.test", filter=filter)
        self.assertEqual(verdict.action, "tempfail")
        self.assertEqual((verdict.reply.code, verdict.reply.status), (451, "4.7.24"))
        self.assertEqual(session.auth_results[0].result, "temperror")
        _, verdict = yield self.check("x@servfail.test")
        self.assertEqual(verdict.action, "next")
        _, verdict = yield self.check("x@syntax.test", filter=filter)
        self.assertEqual(verdict.action, "next")

    @defer.inlineCallbacks
    def test_reject_permerror(self):
        filter = self.make(reject_permerror=True)
        for domain in ("syntax.test", "c11-0.test", "void3.test"):
            session, verdict = yield self.check("x@" + domain, filter=filter)
            self.assertEqual(verdict.action, "reject", domain)
            self.assertEqual((verdict.reply.code, verdict.reply.status), (550, "5.7.24"))
            self.assertIn(domain, verdict.reply.text)
        _, verdict = yield self.check("x@fail.test", filter=filter)
        self.assertEqual(verdict.action, "next")

    @defer.inlineCallbacks
    def test_no_client_address(self):
        session, verdict = yield self.check("x@fail.test", client_ip="",
                                            filter=self.make(reject_fail=True))
        self.assertEqual((verdict.action, session.transaction), ("next", {}))

    @defer.inlineCallbacks
    def test_unexpected_error_is_temperror(self):
        def broken(*args, **kwargs):
            raise ZeroDivisionError()

        self.patch(self.bridge, "spf_query", broken)
        session, verdict = yield self.check("x@pass.test", filter=self.make(tempfail_on_error=True))
        self.assertEqual(session.transaction["spf"]["result"], "temperror")
        self.assertEqual(verdict.action, "tempfail")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_make(self):
        class Config:
            spf = SPFConfig(reject_fail=True)
            dns = DNSConfig(timeout=1.0)

            class gateway:
                hostname = "gw.example"

        context = {"config": Config(), "reactor": reactor, "resolver": self.resolver,
                   "run_in_thread": run_in_thread}
        filter = spf_filter.make(context)
        self.assertEqual((filter.name, filter.config, filter.hostname),
                         ("spf", Config.spf, "gw.example"))
        self.assertIs(filter.bridge.resolver, self.resolver)
        self.assertEqual(filter.bridge.timeout, 2.0)  # [dns] timeout, plus a second
