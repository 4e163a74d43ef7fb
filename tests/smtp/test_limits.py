"""
The limits across sessions in the listener's dialogue (mailgate.smtp.limits over
mailgate.smtp.anvil): exact replies at connect, MAIL, RCPT, AUTH and DATA, on an injected Clock,
with several sessions sharing one Anvil as the sessions of one gateway do.
"""

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.config import RELAY_IPS, Limits, Rate
from mailgate.events import EventBus
from mailgate.smtp.anvil import Anvil
from mailgate.smtp.limits import Guard, is_exempt, too_many_received

from tests.smtphelp import MemoryAuth, MemoryQueue, Session, TLSStringTransport, listener

MESSAGE = "Subject: hi\r\n\r\nhello\r\n.\r\n"
NOBODY_EXEMPT = dict(limit_exempt_ips=())


def limits(**kw):
    values = dict(NOBODY_EXEMPT)
    values.update(kw)
    return Limits(**values)


class Gateway:
    """Sessions of one gateway: one Anvil, one clock, one event bus, one auth backend."""

    def __init__(self, **listener_kw):
        self.clock = Clock()
        self.clock.advance(1000)
        self.anvil = Anvil(self.clock)
        self.events = EventBus(self.clock)
        self.tracked = []
        self.events.subscribe(lambda kind, f: self.tracked.append(f) if kind == "tracking" else None)
        self.auth = MemoryAuth()
        self.queue = MemoryQueue()
        self.listener = listener(**listener_kw)

    def connect(self, peer="192.0.2.10"):
        s = Session(self.listener, clock=self.clock, events=self.events, auth=self.auth,
                    queue=self.queue)
        s.factory.anvil = self.anvil
        address = IPv6Address("TCP", peer, 40000) if ":" in peer else IPv4Address("TCP", peer, 40000)
        s.transport = TLSStringTransport(peerAddress=address)
        s.proto = s.factory.buildProtocol(None)
        s.proto.makeConnection(s.transport)
        return s

    def rejects(self, limit=None):
        return [f for f in self.tracked if f["event"] == "REJECT"
                and (limit is None or f.get("limit") == limit)]


def hang_up(s):
    s.proto.connectionLost(None)


class ConnectionLimitTests(unittest.TestCase):
    def test_per_ip_limit_then_freed_on_disconnect(self):
        g = Gateway(limits=limits(max_connections_per_ip=2))
        first, second = g.connect(), g.connect()
        self.assertTrue(first.read().startswith("220 "))
        third = g.connect()
        self.assertEqual(third.read(), "421 4.7.0 mx.example.net Too many connections\r\n")
        self.assertTrue(third.closed)
        hang_up(third)  # a refused connection was never counted: it frees nothing
        self.assertEqual(g.anvil.open_from("192.0.2.10"), 2)
        self.assertTrue(g.connect("192.0.2.11").read().startswith("220 "))
        hang_up(first)
        self.assertTrue(g.connect().read().startswith("220 "))
        [event] = g.rejects("max_connections_per_ip")
        self.assertEqual((event["stage"], event["client"], event["reply"]),
                         ("CONNECT", "192.0.2.10", "421 4.7.0 mx.example.net Too many connections"))

    def test_refused_before_any_session_work(self):
        """No session, no protocol events, no on_connect hook: the flood costs a lookup."""
        called = []

        class Hooks:
            def on_connect(self, session):
                called.append(session)

        g = Gateway(limits=limits(max_connections=1))
        g.connect()
        protocol_events = []
        g.events.subscribe(lambda kind, f: protocol_events.append(f) if kind == "protocol" else None)
        s = Session(g.listener, clock=g.clock, events=g.events, hooks=Hooks())
        s.factory.anvil = g.anvil
        s.transport.clear()
        del called[:], protocol_events[:]  # Session() made a first connection of its own
        s.proto = s.factory.buildProtocol(None)
        s.proto.makeConnection(s.transport)
        self.assertEqual(s.read(), "421 4.7.0 mx.example.net Too many connections\r\n")
        self.assertIsNone(s.proto.session)
        self.assertEqual(called, [])
        self.assertEqual(protocol_events, [])
        hang_up(s)
        self.assertEqual(g.rejects("max_connections")[0]["stage"], "CONNECT")

    def test_gateway_wide_count_with_a_listener_threshold(self):
        """max_connections counts every listener's sessions; each listener has its threshold."""
        g = Gateway(limits=limits(max_connections=2))
        g.connect("192.0.2.1"), g.connect("192.0.2.2")
        self.assertIn("Too many connections", g.connect("192.0.2.3").read())
        g.listener = listener(name="exchange", limits=limits(max_connections=5))
        self.assertTrue(g.connect("192.0.2.3").read().startswith("220 "))

    def test_ipv6_counted_per_64(self):
        g = Gateway(limits=limits(max_connections_per_ip=2))
        g.connect("2001:db8:1:2::1"), g.connect("2001:db8:1:2:ffff::2")
        self.assertIn("Too many connections", g.connect("2001:db8:1:2:abcd::3").read())
        self.assertTrue(g.connect("2001:db8:1:3::1").read().startswith("220 "))

    def test_connection_rate(self):
        g = Gateway(limits=limits(connection_rate_per_ip=Rate(3, 60.0)))
        for _ in range(3):
            hang_up(g.connect())
        s = g.connect()
        self.assertEqual(
            s.read(), "421 4.7.0 mx.example.net Too many connections from 192.0.2.10, try again later\r\n")
        self.assertTrue(s.closed)
        g.clock.advance(20)  # one token per 20 s
        self.assertTrue(g.connect().read().startswith("220 "))
        self.assertIn("Too many connections", g.connect().read())
        self.assertEqual(len(g.rejects("connection_rate_per_ip")), 2)

    def test_exempt_ips_skip_the_per_ip_limits_but_not_max_connections(self):
        g = Gateway(relay_ips=["10.0.0.0/8"], limits=Limits(
            max_connections=4, max_connections_per_ip=1, connection_rate_per_ip=Rate(1, 3600.0)))
        for _ in range(3):
            self.assertTrue(g.connect("10.1.1.1").read().startswith("220 "))  # relay_ips
        self.assertTrue(g.connect("127.0.0.1").read().startswith("220 "))  # loopback
        self.assertIn("Too many connections", g.connect("10.1.1.1").read())  # max_connections


class GreetingTests(unittest.TestCase):
    def test_early_talker_is_refused_and_closed(self):
        g = Gateway(limits=limits(greet_delay=3.0))
        s = g.connect()
        self.assertEqual(s.read(), "")
        g.clock.advance(1)
        s.send("EHLO spammer.example\r\n")
        self.assertEqual(s.read(), "554 5.5.0 Protocol error\r\n")
        self.assertTrue(s.closed)
        g.clock.advance(5)
        self.assertEqual(s.read(), "")  # no banner after all
        self.assertEqual(g.rejects("early_talker")[0]["stage"], "CONNECT")

    def test_patient_client_gets_the_banner_after_the_delay(self):
        g = Gateway(limits=limits(greet_delay=3.0))
        s = g.connect()
        g.clock.advance(2.9)
        self.assertEqual(s.read(), "")
        g.clock.advance(0.1)
        self.assertEqual(s.read(), "220 mx.example.net ESMTP\r\n")
        self.assertTrue(s.cmd("EHLO c.example").startswith("250-"))

    def test_early_talker_without_delay_while_the_banner_is_held(self):
        """greet_delay 0: talking before the banner (held by the recovery gate) still fails."""
        g = Gateway(limits=limits())
        s = Session(g.listener, clock=g.clock)
        s.factory.gate._open = False
        s.transport.clear()
        s.proto = s.factory.buildProtocol(None)
        s.proto.makeConnection(s.transport)
        s.send("EHLO x\r\n")
        self.assertEqual(s.read(), "554 5.5.0 Protocol error\r\n")

    def test_exempt_clients_are_greeted_at_once(self):
        g = Gateway(limits=Limits(greet_delay=5.0))
        self.assertEqual(g.connect("127.0.0.1").read(), "220 mx.example.net ESMTP\r\n")


class RateTests(unittest.TestCase):
    def session(self, g, peer="192.0.2.10"):
        s = g.connect(peer)
        s.read()
        s.cmd("EHLO c.example")
        return s

    def test_message_rate_per_ip(self):
        g = Gateway(limits=limits(message_rate_per_ip=Rate(2, 3600.0)))
        s = self.session(g)
        for _ in range(2):
            self.assertTrue(s.cmd("MAIL FROM:<a@remote.example>").startswith("250 "))
            s.cmd("RSET")
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"),
                         "450 4.7.1 Too much mail from 192.0.2.10, try again later\r\n")
        # Counted across sessions, per address.
        other = self.session(g)
        self.assertTrue(other.cmd("MAIL FROM:<a@remote.example>").startswith("450 4.7.1"))
        self.assertTrue(self.session(g, "192.0.2.99").cmd("MAIL FROM:<a@r.example>").startswith("250"))
        [first, second] = g.rejects("message_rate_per_ip")
        self.assertEqual((first["stage"], first["sender"]), ("MAIL", "a@remote.example"))
        g.clock.advance(1800)
        self.assertTrue(self.session(g).cmd("MAIL FROM:<a@remote.example>").startswith("250 "))

    def test_recipient_rate_per_ip_counts_refused_recipients_too(self):
        g = Gateway(limits=limits(recipient_rate_per_ip=Rate(3, 60.0)))
        s = self.session(g)
        s.cmd("MAIL FROM:<a@remote.example>")
        self.assertIn("Relay access denied", s.cmd("RCPT TO:<x@else.example>"))
        self.assertTrue(s.cmd("RCPT TO:<u@example.com>").startswith("250 "))
        self.assertTrue(s.cmd("RCPT TO:<v@example.com>").startswith("250 "))
        self.assertEqual(s.cmd("RCPT TO:<w@example.com>"),
                         "450 4.7.1 Too many recipients from 192.0.2.10, try again later\r\n")
        self.assertEqual(g.rejects("recipient_rate_per_ip")[0]["recipients"], ["w@example.com"])
        # The message goes on with the recipients that were accepted.
        self.assertTrue(s.cmd("DATA").startswith("354"))
        s.send(MESSAGE)
        self.assertTrue(s.read().startswith("250 2.0.0 Ok: queued"))
        [(envelope, _)] = g.queue.messages.values()
        self.assertEqual(envelope.recipients, ("u@example.com", "v@example.com"))

    def test_rate_refusals_of_rcpt_do_not_end_the_session(self):
        g = Gateway(limits=limits(recipient_rate_per_ip=Rate(1, 3600.0), max_errors=3))
        s = self.session(g)
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        for _ in range(5):
            self.assertTrue(s.cmd("RCPT TO:<v@example.com>").startswith("450 4.7.1"))
        self.assertFalse(s.closed)

    def authenticated(self, g, peer="192.0.2.10"):
        s = g.connect(peer)
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        self.assertTrue(s.login().startswith("235 "))
        return s

    def test_per_user_rates_follow_the_user_across_addresses(self):
        g = Gateway(role="submission", limits=limits(message_rate_per_user=Rate(2, 3600.0),
                                                     recipient_rate_per_user=Rate(3, 3600.0)))
        a = self.authenticated(g, "192.0.2.1")
        self.assertTrue(a.cmd("MAIL FROM:<alice@example.com>").startswith("250"))
        for rcpt in ("x@else.example", "y@else.example"):
            self.assertTrue(a.cmd("RCPT TO:<%s>" % rcpt).startswith("250"))
        b = self.authenticated(g, "198.51.100.7")
        self.assertTrue(b.cmd("MAIL FROM:<alice@example.com>").startswith("250"))
        self.assertTrue(b.cmd("RCPT TO:<z@else.example>").startswith("250"))
        self.assertEqual(b.cmd("RCPT TO:<w@else.example>"),
                         "450 4.7.1 Too many recipients from alice@example.com, try again later\r\n")
        b.cmd("RSET")
        self.assertEqual(b.cmd("MAIL FROM:<alice@example.com>"),
                         "450 4.7.1 Too much mail from alice@example.com, try again later\r\n")
        self.assertEqual(len(g.rejects("message_rate_per_user")), 1)
        self.assertEqual(len(g.rejects("recipient_rate_per_user")), 1)

    def test_authenticated_clients_exempt_from_per_ip_rates(self):
        rate = Rate(1, 3600.0)
        g = Gateway(role="submission", limits=limits(message_rate_per_ip=rate,
                                                     limit_exempt_authenticated=True))
        s = self.authenticated(g)
        for _ in range(3):
            self.assertTrue(s.cmd("MAIL FROM:<alice@example.com>").startswith("250"))
            s.cmd("RSET")
        g2 = Gateway(role="submission", limits=limits(message_rate_per_ip=rate))
        s2 = self.authenticated(g2)
        s2.cmd("MAIL FROM:<alice@example.com>")
        s2.cmd("RSET")
        self.assertTrue(s2.cmd("MAIL FROM:<alice@example.com>").startswith("450 4.7.1"))

    def test_disabled_limits_are_not_consulted(self):
        """With the rates off, MAIL and RCPT never reach the anvil."""
        g = Gateway(limits=limits())
        s = self.session(g)
        self.assertFalse(s.proto.guard.at_mail or s.proto.guard.at_rcpt)
        g.anvil.take = None  # any call would raise
        self.assertTrue(s.cmd("MAIL FROM:<a@remote.example>").startswith("250"))
        self.assertTrue(s.cmd("RCPT TO:<u@example.com>").startswith("250"))


class BruteForceTests(unittest.TestCase):
    def tls_session(self, g, peer="192.0.2.10"):
        s = g.connect(peer)
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        return s

    def test_failed_auth_is_answered_after_the_delay_without_holding_others(self):
        g = Gateway(role="submission", limits=limits(auth_failure_delay=2.0))
        s = self.tls_session(g)
        other = self.tls_session(g, "192.0.2.77")
        self.assertEqual(s.cmd("AUTH PLAIN " + plain("alice@example.com", "wrong")), "")
        s.send("NOOP\r\n")  # pipelined: answered after the held reply, in order
        self.assertTrue(other.login().startswith("235 "))  # another session is not held up
        g.clock.advance(1.9)
        self.assertEqual(s.read(), "")
        g.clock.advance(0.1)
        self.assertEqual(s.read(), "535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 Ok\r\n")

    def test_unknown_user_and_wrong_password_look_alike(self):
        g = Gateway(role="submission", limits=limits(auth_failure_delay=1.0))
        times, answers = [], []
        for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", "wrong")):
            s = self.tls_session(g)
            started = g.clock.seconds()
            s.cmd("AUTH PLAIN " + plain(user, password))
            while not s.transport.value():
                g.clock.advance(0.25)
            times.append(g.clock.seconds() - started)
            answers.append(s.read())
        self.assertEqual(times, [1.0, 1.0])
        self.assertEqual(answers[0], answers[1])

    def test_the_delay_counts_from_when_the_check_began(self):
        """A slow backend adds no time on top of the delay: the timing does not tell."""
        g = Gateway(role="submission", limits=limits(auth_failure_delay=1.0))
        g.auth.delayed = True
        s = self.tls_session(g)
        s.cmd("AUTH PLAIN " + plain("alice@example.com", "wrong"))
        g.clock.advance(0.7)
        d, result = g.auth.pending.pop()
        d.callback(result)
        self.assertEqual(s.read(), "")
        g.clock.advance(0.3)
        self.assertTrue(s.read().startswith("535 5.7.8"))

    def test_per_ip_lockout_without_checking_the_password(self):
        g = Gateway(role="submission",
                    limits=limits(max_auth_failures_per_ip=3, max_auth_failures=10,
                                  auth_failure_window=600.0))
        for _ in range(3):
            s = self.tls_session(g)
            self.assertTrue(s.login(password="wrong").startswith("535 "))
        calls = []
        original = g.auth.authenticate
        g.auth.authenticate = lambda u, p: calls.append(u) or original(u, p)
        s = self.tls_session(g)
        self.assertEqual(s.cmd("AUTH PLAIN " + plain("alice@example.com", "secret")),
                         "454 4.7.0 Too many failed authentications, try later\r\n")
        self.assertEqual(calls, [])  # the right password is not even checked
        self.assertTrue(self.tls_session(g, "192.0.2.200").login().startswith("235 "))
        [event] = g.rejects("max_auth_failures_per_ip")
        self.assertEqual(event["stage"], "AUTH")
        g.clock.advance(601)
        self.assertTrue(self.tls_session(g).login().startswith("235 "))

    def test_per_user_lockout_across_addresses(self):
        g = Gateway(role="submission", limits=limits(max_auth_failures_per_user=4))
        for i in range(4):
            s = self.tls_session(g, "198.51.100.%d" % i)
            self.assertTrue(s.login("Alice@Example.com", "guess%d" % i).startswith("535 "))
        s = self.tls_session(g, "203.0.113.5")
        self.assertEqual(s.login(), "454 4.7.0 Too many failed authentications, try later\r\n")
        # Another account from the same address is not affected.
        g.auth.users["bob@example.com"] = ("pw", g.auth.users["alice@example.com"][1])
        self.assertTrue(s.login("bob@example.com", "pw").startswith("235 "))
        self.assertEqual(len(g.rejects("max_auth_failures_per_user")), 1)

    def test_exempt_addresses_are_not_locked_out(self):
        g = Gateway(role="submission", limits=Limits(max_auth_failures_per_ip=1, max_auth_failures=10))
        s = self.tls_session(g, "127.0.0.1")
        for _ in range(3):
            self.assertTrue(s.login(password="wrong").startswith("535 "))
        self.assertTrue(s.login().startswith("235 "))


class DataTests(unittest.TestCase):
    def into_data(self, g):
        s = g.connect()
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        self.assertTrue(s.cmd("DATA").startswith("354"))
        return s

    def test_too_many_received_headers(self):
        g = Gateway(limits=limits(max_received_headers=3))
        s = self.into_data(g)
        hops = "".join("Received: from h%d by h%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
                       for i in range(4))
        s.send(hops + MESSAGE)
        self.assertEqual(s.read(), "554 5.4.6 Too many hops (mail loop)\r\n")
        self.assertEqual(g.queue.messages, {})
        [event] = g.rejects("max_received_headers")
        self.assertEqual(event["stage"], "DATA")
        # Three are fine; "received:" in the body does not count.
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send("".join(hops.splitlines(True)[:3]) + "Subject: x\r\n\r\n" + "Received: x\r\n" * 9 + ".\r\n")
        self.assertTrue(s.read().startswith("250 2.0.0"))

    def test_received_counting(self):
        self.assertFalse(too_many_received(b"Received: a\r\nReceived: b\r\n\r\nReceived: c\r\n", 2))
        self.assertTrue(too_many_received(b"received: a\r\nRECEIVED: b\r\n\r\n", 1))
        self.assertTrue(too_many_received(b"Received: a\r\nX: y\r\nReceived: b\r\n", 1))
        self.assertFalse(too_many_received(b"X-Received: a\r\nReceived: b\r\n\r\n", 1))

    def test_slow_data_is_closed_with_421(self):
        g = Gateway(limits=limits(min_data_rate=100))
        s = self.into_data(g)
        for _ in range(3):
            s.send("x" * 1200 + "\r\n")  # 1202 bytes per 10 s: fast enough
            g.clock.advance(10)
        self.assertEqual(s.read(), "")
        g.clock.advance(30)  # 3606 bytes in 60 s: below 100 B/s
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: data rate below the minimum\r\n")
        self.assertTrue(s.closed)
        self.assertEqual(g.rejects("min_data_rate")[0]["stage"], "DATA")

    def test_data_rate_check_stops_after_the_message(self):
        g = Gateway(limits=limits(min_data_rate=100))
        s = self.into_data(g)
        s.send(MESSAGE)
        self.assertTrue(s.read().startswith("250 "))
        g.clock.advance(299)
        self.assertEqual(s.read(), "")
        g.clock.advance(1)  # only the command timeout, 5 minutes later
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: command timeout exceeded\r\n")


class GuardTests(unittest.TestCase):
    def test_is_exempt_expands_relay_ips(self):
        config = listener(relay_ips=["10.0.0.0/8"], limits=Limits(
            limit_exempt_ips=(RELAY_IPS, ipaddress.ip_network("192.0.2.0/24"))))
        self.assertTrue(is_exempt(config, "10.2.3.4"))
        self.assertTrue(is_exempt(config, "192.0.2.9"))
        self.assertTrue(is_exempt(config, "::ffff:10.2.3.4"))
        self.assertFalse(is_exempt(config, "198.51.100.1"))
        self.assertFalse(is_exempt(listener(limits=Limits(limit_exempt_ips=())), "127.0.0.1"))

    def test_guard_of_an_exempt_client_checks_nothing(self):
        guard = Guard(Anvil(Clock()), listener(limits=Limits(message_rate_per_ip=Rate(1, 1.0),
                                                             greet_delay=3.0)), "mx", "127.0.0.1")
        self.assertEqual((guard.at_mail, guard.at_rcpt, guard.at_auth, guard.greet_delay),
                         (False, False, False, 0.0))


def plain(user, password):
    import base64

    return base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
