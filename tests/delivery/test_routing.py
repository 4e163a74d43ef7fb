"""
Tests for mailgate.delivery.routing: which route a domain takes, and the hops it gives.

DNS comes from the loopback TestDNS on the test reactor through the real resolver
(mailgate.resolver.make_resolver): nothing reaches the system resolver.
"""

import random

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate.config import DNSConfig, RouteConfig
from mailgate.envelope import Hop
from mailgate.errors import RoutingError
from mailgate.resolver import make_resolver
from mailgate.delivery.routing import Router
from tests.dnsserver import TestDNS

HOSTNAME = "mx.gateway.test"
MX_PORT = 2525
LISTENERS = {("127.0.0.1", MX_PORT), ("127.0.0.1", 587)}


class RouteForTests(SynchronousTestCase):
    def setUp(self):
        self.exact = RouteConfig("exact", ("example.com", "Other.TEST."), smarthosts=(("h", 25),))
        self.sub = RouteConfig("sub", (".example.com",), smarthosts=(("h", 25),))
        self.deeper = RouteConfig("deeper", (".b.example.com",), smarthosts=(("h", 25),))
        self.star = RouteConfig("star", ("*",), mx=True)
        self.late = RouteConfig("late", ("example.com", ".example.com", "*"), mx=True)
        routes = [self.exact, self.sub, self.deeper, self.star, self.late]
        self.router = Router(routes, None, HOSTNAME, LISTENERS, MX_PORT)

    def test_matrix(self):
        for domain, route in [
            ("example.com", self.exact),
            ("EXAMPLE.com.", self.exact),
            ("other.test", self.exact),
            ("a.example.com", self.sub),
            ("b.example.com", self.sub),  # ".b.example.com" is for names below it only
            ("a.b.example.com", self.deeper),
            ("x.a.B.Example.Com", self.deeper),
            ("notexample.com", self.star),
            ("com", self.star),
            ("sub.other.test", self.star),
            ("[192.0.2.1]", self.star),  # address literals only ever match "*"
            ("[IPv6:2001:db8::1]", self.star),
        ]:
            self.assertIs(self.router.route_for(domain), route, domain)

    def test_literal_never_matches_a_domain(self):
        route = RouteConfig("lit", ("192.0.2.1", ".0.2.1"), smarthosts=(("h", 25),))
        router = Router([route], None, HOSTNAME, LISTENERS, MX_PORT)
        self.assertIsNone(router.route_for("[192.0.2.1]"))
        self.assertIs(router.route_for("192.0.2.1"), route)

    def test_no_wildcard(self):
        router = Router([self.exact, self.sub], None, HOSTNAME, LISTENERS, MX_PORT)
        self.assertIsNone(router.route_for("elsewhere.test"))
        self.assertIsNone(router.route_for("example.com.elsewhere.test"))
        self.assertIs(router.route_for("example.com"), self.exact)


def routing_zone():
    zone = TestDNS()
    # smarthosts
    zone.add("relay.example.net", "A", "127.0.0.20")
    zone.add("relay.example.net", "AAAA", "::1")
    zone.add("relay2.example.net", "A", "127.0.0.21")
    # MX by preference, each host with its addresses
    for preference, host in [(30, "c"), (10, "a"), (20, "b")]:
        zone.add("ordered.test", "MX", (preference, "%s.ordered.test" % host))
    zone.add("a.ordered.test", "A", "127.0.0.11")
    zone.add("a.ordered.test", "AAAA", "::1")
    zone.add("a.ordered.test", "A", "127.0.0.12")
    zone.add("b.ordered.test", "A", "127.0.0.13")
    zone.add("c.ordered.test", "AAAA", "2001:db8::c")
    # equal preferences
    zone.add("equal.test", "MX", (20, "last.equal.test"))
    zone.add("equal.test", "MX", (5, "first.equal.test"))
    for name in ("p", "q", "r", "s"):
        zone.add("equal.test", "MX", (10, "%s.equal.test" % name))
    for i, name in enumerate(("first", "p", "q", "r", "s", "last")):
        zone.add("%s.equal.test" % name, "A", "127.0.1.%d" % (i + 1))
    # implicit MX, none at all, null MX
    zone.add("implicit.test", "A", "127.0.0.30")
    zone.add("implicit.test", "AAAA", "::1")
    zone.add("nomail.test", "TXT", "v=spf1 -all")
    zone.add("null.test", "MX", (0, "."))
    zone.add("halfnull.test", "MX", (0, "."))
    zone.add("halfnull.test", "MX", (10, "a.ordered.test"))
    # CNAMEs: for the domain, and for an MX host
    zone.add("alias.test", "CNAME", "ordered.test")
    zone.add("cnamed.test", "MX", (10, "www.cnamed.test"))
    zone.add("www.cnamed.test", "CNAME", "b.ordered.test")
    # broken things
    zone.hang("slow.test")
    zone.fail("servfail.test", "SERVFAIL")
    zone.add("slowa.test", "TXT", "exists")
    zone.hang("slowa.test", rtype="A")
    zone.add("unresolvable.test", "MX", (10, "nowhere.unresolvable.test"))
    zone.add("unresolvable.test", "MX", (20, "broken.unresolvable.test"))
    zone.fail("broken.unresolvable.test", "SERVFAIL")
    zone.add("someok.test", "MX", (10, "nowhere.someok.test"))
    zone.add("someok.test", "MX", (20, "b.ordered.test"))
    # loops: by our hostname, and by our listener's address
    zone.add("onlyus.test", "MX", (10, HOSTNAME.upper() + "."))
    zone.add(HOSTNAME, "A", "127.0.0.1")
    zone.add("backup.test", "MX", (5, "a.ordered.test"))
    zone.add("backup.test", "MX", (10, HOSTNAME))
    zone.add("backup.test", "MX", (10, "b.ordered.test"))  # same preference as ours: dropped
    zone.add("backup.test", "MX", (20, "c.ordered.test"))
    zone.add("primaryus.test", "MX", (10, HOSTNAME))
    zone.add("primaryus.test", "MX", (20, "a.ordered.test"))
    zone.add("self.test", "A", "127.0.0.1")
    zone.add("byaddress.test", "MX", (10, "self.test"))
    zone.add("backupbyaddress.test", "MX", (10, "b.ordered.test"))
    zone.add("backupbyaddress.test", "MX", (20, "self.test"))
    zone.add("backupbyaddress.test", "MX", (30, "c.ordered.test"))
    zone.add("primarydown.test", "MX", (10, "broken.unresolvable.test"))
    zone.add("primarydown.test", "MX", (20, "self.test"))
    zone.add("mixedself.test", "A", "127.0.0.40")
    zone.add("mixedself.test", "A", "127.0.0.1")
    zone.add("twice.test", "MX", (10, "b.ordered.test"))
    zone.add("twice.test", "MX", (20, "www.cnamed.test"))
    return zone


class HopsTestCase(TestCase):
    local_addresses = LISTENERS

    def setUp(self):
        self.zone = routing_zone()
        port = self.zone.listen(reactor, self)
        self.resolver = make_resolver(DNSConfig(nameservers=(("127.0.0.1", port),), timeout=0.2),
                                      reactor)
        self.router = self.make_router()

    def make_router(self, seed=0):
        return Router([], self.resolver, HOSTNAME, self.local_addresses, MX_PORT,
                      random=random.Random(seed))

    def hops(self, domain, route=None, router=None):
        route = route or RouteConfig("mx", ("*",), mx=True)
        return (router or self.router).hops(route, domain)

    @defer.inlineCallbacks
    def assertRoutingError(self, d, status, permanent, text=None):
        e = yield self.assertFailure(d, RoutingError)
        self.assertEqual((e.status, e.permanent), (status, permanent), str(e))
        if text is not None:
            self.assertIn(text, e.text)
        return e

    def assertAddresses(self, hops, expected):
        self.assertEqual([(hop.name, hop.address, hop.port) for hop in hops], expected)


class SmarthostTests(HopsTestCase):
    def route(self, *smarthosts):
        return RouteConfig("relay", ("*",), smarthosts=smarthosts)

    @defer.inlineCallbacks
    def test_order_names_and_literals(self):
        route = self.route(("relay.example.net", 587), ("192.0.2.10", 25),
                           ("2001:DB8::5", 2525), ("relay2.example.net", 25))
        hops = yield self.hops("example.com", route)
        self.assertAddresses(hops, [
            ("relay.example.net", "127.0.0.20", 587),
            ("relay.example.net", "::1", 587),
            ("192.0.2.10", "192.0.2.10", 25),
            ("2001:DB8::5", "2001:db8::5", 2525),
            ("relay2.example.net", "127.0.0.21", 25),
        ])
        self.assertIsInstance(hops[0], Hop)

    @defer.inlineCallbacks
    def test_literals_need_no_dns(self):
        hops = yield self.hops("example.com", self.route(("192.0.2.10", 25), ("[IPv6:::2]", 26)))
        self.assertAddresses(hops, [("192.0.2.10", "192.0.2.10", 25), ("[IPv6:::2]", "::2", 26)])
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_unresolvable_skipped(self):
        route = self.route(("nowhere.example.net", 25), ("slow.test", 25), ("relay2.example.net", 25))
        hops = yield self.hops("example.com", route)
        self.assertAddresses(hops, [("relay2.example.net", "127.0.0.21", 25)])

    @defer.inlineCallbacks
    def test_none_resolves(self):
        route = self.route(("nowhere.example.net", 25), ("servfail.test", 25), ("nomail.test", 25))
        e = yield self.assertRoutingError(self.hops("example.com", route), "4.4.3", False)
        self.assertIn("nowhere.example.net: NXDOMAIN", e.text)
        self.assertIn("servfail.test: SERVFAIL", e.text)
        self.assertIn("nomail.test: no address", e.text)

    @defer.inlineCallbacks
    def test_timeout(self):
        yield self.assertRoutingError(self.hops("example.com", self.route(("slow.test", 25))),
                                      "4.4.3", False, "slow.test: timeout")

    @defer.inlineCallbacks
    def test_ourselves(self):
        for host in ("127.0.0.1", "self.test", "::ffff:127.0.0.1"):
            route = self.route(("relay2.example.net", 25), (host, MX_PORT))
            yield self.assertRoutingError(self.hops("example.com", route), "5.4.6", True,
                                          "Mail for example.com loops back to myself")
        hops = yield self.hops("example.com", self.route(("127.0.0.1", 25)))  # another port
        self.assertAddresses(hops, [("127.0.0.1", "127.0.0.1", 25)])

    @defer.inlineCallbacks
    def test_neither_smarthosts_nor_mx(self):
        yield self.assertRoutingError(self.hops("example.com", RouteConfig("empty", ("*",))),
                                      "4.3.5", False)

    @defer.inlineCallbacks
    def test_duplicates_dropped(self):
        route = self.route(("relay2.example.net", 25), ("127.0.0.21", 25))
        hops = yield self.hops("example.com", route)
        self.assertAddresses(hops, [("relay2.example.net", "127.0.0.21", 25)])


class MXTests(HopsTestCase):
    @defer.inlineCallbacks
    def test_preference_order(self):
        hops = yield self.hops("ordered.test")
        self.assertAddresses(hops, [
            ("a.ordered.test", "127.0.0.11", MX_PORT),
            ("a.ordered.test", "127.0.0.12", MX_PORT),
            ("a.ordered.test", "::1", MX_PORT),
            ("b.ordered.test", "127.0.0.13", MX_PORT),
            ("c.ordered.test", "2001:db8::c", MX_PORT),
        ])

    @defer.inlineCallbacks
    def test_equal_preferences_shuffled(self):
        orders = set()
        for seed in range(20):
            hops = yield self.hops("EQUAL.test.", router=self.make_router(seed))
            names = [hop.name.split(".")[0] for hop in hops]
            self.assertEqual((names[0], sorted(names[1:5]), names[5]),
                             ("first", ["p", "q", "r", "s"], "last"))
            again = yield self.hops("equal.test", router=self.make_router(seed))
            self.assertEqual(again, hops)  # the same seed, the same order
            orders.add(tuple(names))
        self.assertGreater(len(orders), 5)
        self.assertEqual(self.zone.count("equal.test", "MX"), 1)  # the rest from the cache

    @defer.inlineCallbacks
    def test_implicit_mx(self):
        hops = yield self.hops("implicit.test")
        self.assertAddresses(hops, [("implicit.test", "127.0.0.30", MX_PORT),
                                    ("implicit.test", "::1", MX_PORT)])

    @defer.inlineCallbacks
    def test_no_mx_no_address(self):
        yield self.assertRoutingError(self.hops("nomail.test"), "5.1.2", True)

    @defer.inlineCallbacks
    def test_null_mx(self):
        e = yield self.assertRoutingError(self.hops("null.test"), "5.1.10", True)
        self.assertEqual(e.text, "Recipient domain does not accept mail (null MX)")
        self.assertEqual(self.zone.count(rtype="A"), 0)  # no implicit MX

    @defer.inlineCallbacks
    def test_null_mx_beside_real_ones_ignored(self):
        hops = yield self.hops("halfnull.test")
        self.assertEqual({hop.name for hop in hops}, {"a.ordered.test"})

    @defer.inlineCallbacks
    def test_nxdomain(self):
        e = yield self.assertRoutingError(self.hops("nowhere.test"), "5.1.2", True)
        self.assertEqual(e.text, "Domain not found")

    @defer.inlineCallbacks
    def test_timeout_is_temporary(self):
        e = yield self.assertRoutingError(self.hops("slow.test"), "4.4.3", False)
        self.assertEqual(e.text, "DNS lookup failed: timeout for MX slow.test")

    @defer.inlineCallbacks
    def test_servfail_is_temporary(self):
        e = yield self.assertRoutingError(self.hops("servfail.test"), "4.4.3", False)
        self.assertTrue(e.text.startswith("DNS lookup failed: SERVFAIL"), e.text)

    @defer.inlineCallbacks
    def test_implicit_mx_timeout(self):
        yield self.assertRoutingError(self.hops("slowa.test"), "4.4.3", False, "timeout for A/AAAA")

    @defer.inlineCallbacks
    def test_unresolvable_hosts_skipped(self):
        hops = yield self.hops("someok.test")
        self.assertAddresses(hops, [("b.ordered.test", "127.0.0.13", MX_PORT)])

    @defer.inlineCallbacks
    def test_no_host_resolves(self):
        e = yield self.assertRoutingError(self.hops("unresolvable.test"), "4.4.4", False)
        self.assertIn("nowhere.unresolvable.test: NXDOMAIN", e.text)
        self.assertIn("broken.unresolvable.test: SERVFAIL", e.text)

    @defer.inlineCallbacks
    def test_cnames(self):
        hops = yield self.hops("alias.test")  # the domain is a CNAME: its target's MX
        self.assertEqual(hops[0].name, "a.ordered.test")
        hops = yield self.hops("cnamed.test")  # an MX host that is a CNAME (keeps its MX name)
        self.assertAddresses(hops, [("www.cnamed.test", "127.0.0.13", MX_PORT)])

    @defer.inlineCallbacks
    def test_same_address_once(self):
        hops = yield self.hops("twice.test")
        self.assertAddresses(hops, [("b.ordered.test", "127.0.0.13", MX_PORT)])

    @defer.inlineCallbacks
    def test_address_literal(self):
        hops = yield self.hops("[127.0.0.9]")
        self.assertAddresses(hops, [("127.0.0.9", "127.0.0.9", MX_PORT)])
        hops = yield self.hops("[IPv6:2001:DB8::9]")
        self.assertAddresses(hops, [("2001:db8::9", "2001:db8::9", MX_PORT)])
        self.assertEqual(self.zone.queries, [])
        yield self.assertRoutingError(self.hops("[x-tag:stuff]"), "5.1.2", True)
        yield self.assertRoutingError(self.hops("[127.0.0.1]"), "5.4.6", True)


class LoopTests(HopsTestCase):
    @defer.inlineCallbacks
    def test_only_mx_is_our_hostname(self):
        yield self.assertRoutingError(self.hops("onlyus.test"), "5.4.6", True,
                                      "Mail for onlyus.test loops back to myself")

    @defer.inlineCallbacks
    def test_backup_mx_keeps_lower_preferences_only(self):
        """RFC 5321 5.1: MX records at or above our own preference are dropped."""
        hops = yield self.hops("backup.test")
        self.assertEqual({hop.name for hop in hops}, {"a.ordered.test"})

    @defer.inlineCallbacks
    def test_primary_is_us(self):
        yield self.assertRoutingError(self.hops("primaryus.test"), "5.4.6", True)

    @defer.inlineCallbacks
    def test_implicit_mx_is_us(self):
        router = Router([], self.resolver, "implicit.test", set(), MX_PORT)
        yield self.assertRoutingError(self.hops("implicit.test", router=router), "5.4.6", True)

    @defer.inlineCallbacks
    def test_by_listener_address(self):
        yield self.assertRoutingError(self.hops("byaddress.test"), "5.4.6", True)
        yield self.assertRoutingError(self.hops("self.test"), "5.4.6", True)  # implicit MX

    @defer.inlineCallbacks
    def test_backup_by_listener_address(self):
        hops = yield self.hops("backupbyaddress.test")
        self.assertAddresses(hops, [("b.ordered.test", "127.0.0.13", MX_PORT)])

    @defer.inlineCallbacks
    def test_backup_with_primary_unresolvable_defers(self):
        yield self.assertRoutingError(self.hops("primarydown.test"), "4.4.4", False)

    @defer.inlineCallbacks
    def test_host_with_one_of_its_addresses_ours(self):
        yield self.assertRoutingError(self.hops("mixedself.test"), "5.4.6", True)

    @defer.inlineCallbacks
    def test_listener_on_another_port_is_no_loop(self):
        router = Router([], self.resolver, HOSTNAME, {("127.0.0.1", 587)}, MX_PORT)
        hops = yield self.hops("byaddress.test", router=router)
        self.assertAddresses(hops, [("self.test", "127.0.0.1", MX_PORT)])


class WildcardListenerTests(HopsTestCase):
    """A listener on 0.0.0.0 or :: is on every loopback address and every address we know."""

    local_addresses = {("0.0.0.0", MX_PORT), ("192.0.2.1", 587)}

    def test_is_local(self):
        for address, port, local in [
            ("127.0.0.1", MX_PORT, True),
            ("127.3.4.5", MX_PORT, True),
            ("::1", MX_PORT, True),
            ("0.0.0.0", MX_PORT, True),
            ("192.0.2.1", MX_PORT, True),
            ("192.0.2.1", 587, True),
            ("192.0.2.2", MX_PORT, False),
            ("127.0.0.1", 25, False),
            ("::ffff:127.0.0.1", MX_PORT, True),
            ("not an ip", MX_PORT, False),
            ("::", 587, False),
        ]:
            self.assertEqual(self.router.is_local(address, port), local, (address, port))
        specific = Router([], None, HOSTNAME, {("127.0.0.1", 25)}, 25)
        self.assertTrue(specific.is_local("0.0.0.0", 25))  # connecting there reaches us
        self.assertFalse(specific.is_local("127.0.0.2", 25))
        ipv6 = Router([], None, HOSTNAME, {("::", 25)}, 25)
        self.assertTrue(ipv6.is_local("127.0.0.1", 25))
        self.assertFalse(ipv6.is_local("2001:db8::1", 25))

    @defer.inlineCallbacks
    def test_mx_on_loopback(self):
        yield self.assertRoutingError(self.hops("ordered.test"), "5.4.6", True)


def test_idna_domains_route_by_their_a_label():
    from mailgate.config import RouteConfig
    from mailgate.delivery.routing import Router

    route = RouteConfig(name="b", domains=("xn--bcher-kva.example", ".xn--mnchen-3ya.example"),
                        smarthosts=(("192.0.2.1", 25),))
    router = Router([route], None, "mx.example.net", set(), 25)
    assert router.route_for("bücher.example") is route
    assert router.route_for("BÜCHER.example.") is route
    assert router.route_for("mx.münchen.example") is route
    assert router.route_for("other.example") is None
