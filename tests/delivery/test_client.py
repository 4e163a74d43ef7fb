"""
Outbound delivery (mailgate.delivery.client) against the thread-based SMTP sinks of tests/sinks.py, over
real sockets on 127.0.0.1 with the reactor trial provides.

Each client-side row C1-C5 of ../shared/twisted-mail-notes.md has raw-socket regression tests
named after it (test_C1_..., test_C2_..., ...).  No test sleeps: timeouts are exercised with small
configured values.
"""

import socket
import time

from twisted.internet import defer, error, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailgate.config import DeliveryConfig, RouteConfig, TLSConfig
from mailgate.delivery.client import Deliverer
from mailgate.delivery.dotstuff import stuff
from mailgate.envelope import Hop
from tests.sinks import Sink
from tests.tlsutil import make_ca

HOSTNAME = "gw.test.example"
LOOPBACK = "127.0.0.1"
SENDER = "sender@origin.test"
RCPT = "user@dest.test"
MESSAGE = (
    b"From: <sender@origin.test>\r\n"
    b"To: <user@dest.test>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello there.\r\n"
    b".A line that starts with a dot.\r\n"
)
CHUNK = 16384  # FileSender.CHUNK_SIZE
SMUGGLED = (
    b"MAIL FROM:<evil@attacker.test>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled body\r\n"
)


def make_route(tls="opportunistic", username=None, password=None):
    return RouteConfig(name="test", domains=("*",), tls=tls, username=username, password=password)


def free_port():
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def filler(length):
    """length bytes of CRLF-terminated lines (length >= 2 or 0), none starting with a dot."""
    out = b""
    while length:
        n = min(length, 78)
        if length - n == 1:  # never leave a 1-byte remainder: no line is shorter than CRLF
            n -= 1
        out += b"x" * (n - 2) + b"\r\n"
        length -= n
    return out


def dot_message(offsets, size=None):
    """
    A CRLF message with a lone "." line (then commands a broken client would let the next hop
    run as a new transaction) starting at each offset.
    """
    out = b""
    for offset in sorted(offsets):
        out += filler(offset - len(out))
        assert len(out) == offset, (offset, len(out))
        out += b".\r\n" + SMUGGLED
    if size is not None:
        out += filler(max(0, size - len(out)))
    return out


class DeliveryTestCase(TestCase):
    timeout = 30

    def sink(self, **behaviour):
        sink = Sink(**behaviour)
        sink.start()
        self.addCleanup(lambda: self.assertEqual(sink.errors, []))
        self.addCleanup(sink.stop)
        return sink

    def hop(self, sink, name=LOOPBACK):
        port = sink if isinstance(sink, int) else sink.port
        return Hop(name, LOOPBACK, port)

    def deliverer(self, tls_config=None, connect_timeout=5.0, command_timeout=5.0,
                  data_timeout=10.0):
        config = DeliveryConfig(
            connect_timeout=connect_timeout, command_timeout=command_timeout,
            data_timeout=data_timeout, connection_cache_time=0.0,  # one message per connection
        )
        return Deliverer(reactor, HOSTNAME, config, tls_config or TLSConfig())

    def deliver(self, hops, recipients=(RCPT,), sender=SENDER, data=MESSAGE, route=None,
                deliverer=None):
        if not isinstance(hops, (list, tuple)):
            hops = [hops]
        hops = [h if isinstance(h, Hop) else self.hop(h) for h in hops]
        deliverer = deliverer or self.deliverer()
        return deliverer.deliver(route or make_route(), hops, sender, list(recipients), data)

    def events(self):
        """Log events emitted from now until the end of the test."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def assertOutcome(self, result, outcome, code=None, status=None):
        self.assertEqual(result.outcome, outcome, result)
        if code is not None:
            self.assertEqual(result.code, code, result)
        if status is not None:
            self.assertEqual(result.status, status, result)

    def ca(self):
        directory = self.mktemp()
        ca = make_ca(directory)
        return ca, directory

    def tls_sink(self, hostname=LOOPBACK, ca=None, **behaviour):
        if ca is None:
            ca, _ = self.ca()
        cert, key = ca.issue(hostname, self.mktemp())
        return self.sink(starttls=True, cert=cert, key=key, **behaviour)


# --- the basics ----------------------------------------------------------------------------------


class BasicDeliveryTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_delivers(self):
        sink = self.sink()
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "delivered", 250, "2.0.0")
        self.assertEqual(result.text, "Ok: queued")
        self.assertEqual(result.recipient, RCPT)
        self.assertEqual(result.remote, self.hop(sink))
        self.assertIsNone(result.tls)
        [message] = sink.messages
        self.assertEqual(message["message"], MESSAGE)
        self.assertEqual(message["mail_from"], SENDER)
        self.assertEqual(message["rcpt_to"], [RCPT])
        self.assertEqual(message["helo"], HOSTNAME)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(
            [line.split(b":")[0] for line in sink.commands_of(0)],
            [b"EHLO " + HOSTNAME.encode(), b"MAIL FROM", b"RCPT TO", b"DATA", b"QUIT"],
        )

    @defer.inlineCallbacks
    def test_null_sender(self):
        sink = self.sink()
        [result] = yield self.deliver(sink, sender="")
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["mail_from"], "")
        self.assertIn(b"MAIL FROM:<>", sink.commands_of(0))

    @defer.inlineCallbacks
    def test_per_recipient_550(self):
        sink = self.sink(rcpt={"b@dest.test": (550, "5.1.1 No such user")})
        results = yield self.deliver(sink, recipients=["a@dest.test", "b@dest.test", "c@dest.test"])
        self.assertEqual([r.recipient for r in results],
                         ["a@dest.test", "b@dest.test", "c@dest.test"])
        self.assertOutcome(results[0], "delivered", 250, "2.0.0")
        self.assertOutcome(results[1], "bounced", 550, "5.1.1")
        self.assertEqual(results[1].text, "No such user")
        self.assertEqual(results[1].remote, self.hop(sink))
        self.assertOutcome(results[2], "delivered", 250, "2.0.0")
        self.assertEqual(sink.messages[0]["rcpt_to"], ["a@dest.test", "c@dest.test"])

    @defer.inlineCallbacks
    def test_per_recipient_4xx_is_deferred_without_failover(self):
        first = self.sink(rcpt={"b@dest.test": (452, "4.2.2 Mailbox full")})
        second = self.sink()
        results = yield self.deliver([first, second], recipients=["a@dest.test", "b@dest.test"])
        self.assertOutcome(results[0], "delivered")
        self.assertOutcome(results[1], "deferred", 452, "4.2.2")
        self.assertEqual(results[1].text, "Mailbox full")
        self.assertEqual(second.connections, 0)

    @defer.inlineCallbacks
    def test_all_recipients_4xx_fail_over(self):
        first = self.sink(rcpt_default=(450, "4.2.0 Greylisted"))
        second = self.sink()
        results = yield self.deliver([first, second], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual({r.remote for r in results}, {self.hop(second)})
        self.assertEqual(first.messages, [])

    @defer.inlineCallbacks
    def test_all_recipients_4xx_on_the_last_hop(self):
        sink = self.sink(rcpt={"a@dest.test": (450, "4.2.0 Greylisted"),
                               "b@dest.test": (451, "4.3.0 Try later")})
        results = yield self.deliver(sink, recipients=["a@dest.test", "b@dest.test"])
        self.assertOutcome(results[0], "deferred", 450, "4.2.0")
        self.assertOutcome(results[1], "deferred", 451, "4.3.0")

    @defer.inlineCallbacks
    def test_mixed_5xx_and_4xx_without_acceptance(self):
        first = self.sink(rcpt={"a@dest.test": (550, "5.1.1 No such user"),
                                "b@dest.test": (450, "4.2.0 Greylisted")})
        second = self.sink()
        results = yield self.deliver([first, second], recipients=["a@dest.test", "b@dest.test"])
        self.assertOutcome(results[0], "bounced", 550, "5.1.1")
        self.assertOutcome(results[1], "delivered")
        self.assertEqual(second.messages[0]["rcpt_to"], ["b@dest.test"])

    @defer.inlineCallbacks
    def test_5xx_at_mail_bounces_all(self):
        sink = self.sink(mail_reply=(553, "5.7.1 Sender rejected"))
        results = yield self.deliver(sink, recipients=["a@dest.test", "b@dest.test"])
        for result in results:
            self.assertOutcome(result, "bounced", 553, "5.7.1")
            self.assertEqual(result.text, "Sender rejected")
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_4xx_at_mail_fails_over(self):
        first = self.sink(mail_reply=(451, "4.3.0 Try again later"))
        second = self.sink()
        [result] = yield self.deliver([first, second])
        self.assertOutcome(result, "delivered")
        self.assertEqual(result.remote, self.hop(second))
        self.assertEqual(first.connections, 1)
        self.assertEqual(len(second.messages), 1)

    @defer.inlineCallbacks
    def test_per_connection_replies(self):
        """The same sink twice: its first connection says 451 at MAIL, the second takes it."""
        sink = self.sink(per_connection=[dict(mail_reply=(451, "4.3.0 Busy"))])
        [result] = yield self.deliver([sink, sink])
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.connections, 2)
        self.assertEqual(sink.messages[0]["connection"], 1)

    @defer.inlineCallbacks
    def test_5xx_after_the_dot_bounces(self):
        sink = self.sink(data_reply=(554, "5.7.1 Message refused"),
                         rcpt={"b@dest.test": (452, "4.2.2 Mailbox full")})
        results = yield self.deliver(sink, recipients=["a@dest.test", "b@dest.test"])
        self.assertOutcome(results[0], "bounced", 554, "5.7.1")
        self.assertOutcome(results[1], "deferred", 452, "4.2.2")

    @defer.inlineCallbacks
    def test_4xx_after_the_dot_fails_over(self):
        first = self.sink(data_reply=(451, "4.3.0 Queue trouble"))
        second = self.sink()
        [result] = yield self.deliver([first, second])
        self.assertOutcome(result, "delivered")
        self.assertEqual(result.remote, self.hop(second))
        [result] = yield self.deliver(first)
        self.assertOutcome(result, "deferred", 451, "4.3.0")
        self.assertEqual(result.text, "Queue trouble")

    @defer.inlineCallbacks
    def test_4xx_greeting_fails_over(self):
        first = self.sink(banner=(421, "4.3.2 Too busy"))
        second = self.sink()
        [result] = yield self.deliver([first, second])
        self.assertOutcome(result, "delivered")
        [result] = yield self.deliver(first)
        self.assertOutcome(result, "deferred", 421, "4.3.2")
        self.assertEqual(result.remote, self.hop(first))

    @defer.inlineCallbacks
    def test_5xx_greeting_is_temporary(self):
        sink = self.sink(banner=(554, "5.3.2 No SMTP service here"))
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "deferred", 451, "4.3.2")
        self.assertIn("554 5.3.2 No SMTP service here", result.text)
        self.assertEqual(sink.commands_of(0), [b"QUIT"])

    @defer.inlineCallbacks
    def test_4xx_ehlo_fails_over(self):
        first = self.sink(ehlo_reply=(421, "4.7.0 Go away"))
        second = self.sink()
        [result] = yield self.deliver([first, second])
        self.assertOutcome(result, "delivered")
        self.assertEqual(first.messages, [])

    @defer.inlineCallbacks
    def test_helo_fallback(self):
        sink = self.sink(ehlo_reply=(502, "5.5.1 EHLO not implemented"))
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["helo"], HOSTNAME)

    @defer.inlineCallbacks
    def test_failover_from_refused_port(self):
        refused = free_port()
        sink = self.sink()
        [result] = yield self.deliver([self.hop(refused), self.hop(sink)])
        self.assertOutcome(result, "delivered")
        self.assertEqual(result.remote, self.hop(sink))
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_all_hops_refused(self):
        ports = [free_port(), free_port()]
        results = yield self.deliver([self.hop(p) for p in ports],
                                     recipients=["a@d.test", "b@d.test"])
        for result in results:
            self.assertOutcome(result, "deferred", 451, "4.4.1")
            self.assertEqual(result.text, "connection refused by 127.0.0.1:%d" % ports[1])
            self.assertIsNone(result.remote)

    @defer.inlineCallbacks
    def test_no_hops(self):
        [result] = yield self.deliver([])
        self.assertOutcome(result, "deferred", 451, "4.4.4")

    @defer.inlineCallbacks
    def test_hop_name_not_resolved(self):
        """A hop whose address is a name fails: delivery never asks DNS."""
        [result] = yield self.deliver([Hop("localhost", "localhost", 25)])
        self.assertOutcome(result, "deferred", 451, "4.4.4")

    @defer.inlineCallbacks
    def test_dropped_connection_fails_over(self):
        first = self.sink(drop_after="MAIL")
        second = self.sink()
        [result] = yield self.deliver([first, second])
        self.assertOutcome(result, "delivered")
        [result] = yield self.deliver(first)
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("MAIL", result.text)

    @defer.inlineCallbacks
    def test_drop_after_the_dot_defers(self):
        sink = self.sink(drop_after="DOT")
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("end of DATA", result.text)

    @defer.inlineCallbacks
    def test_duplicate_recipients(self):
        sink = self.sink()
        results = yield self.deliver(sink, recipients=["a@d.test", "b@d.test", "a@d.test"])
        self.assertEqual([r.recipient for r in results], ["a@d.test", "b@d.test", "a@d.test"])
        self.assertEqual([r.outcome for r in results], ["delivered"] * 3)
        self.assertEqual(sink.messages[0]["rcpt_to"], ["a@d.test", "b@d.test"])

    @defer.inlineCallbacks
    def test_address_with_line_break_never_sent(self):
        sink = self.sink()
        results = yield self.deliver(sink, recipients=["a@d.test", "b@d.test\r\nRSET"])
        self.assertOutcome(results[0], "delivered")
        self.assertOutcome(results[1], "bounced", 553, "5.1.3")
        self.assertEqual(sink.messages[0]["rcpt_to"], ["a@d.test"])
        self.assertNotIn(b"RSET", sink.commands_of(0))

    @defer.inlineCallbacks
    def test_ipv6_hop(self):
        sink = Sink(host="::1")
        try:
            sink.start()
        except OSError:
            raise self.skipTest("no IPv6 loopback here")
        self.addCleanup(sink.stop)
        [result] = yield self.deliver(Hop("::1", "::1", sink.port))
        self.assertOutcome(result, "delivered")
        self.assertEqual(len(sink.messages), 1)
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        port = s.getsockname()[1]
        s.close()
        [result] = yield self.deliver(Hop("::1", "::1", port))
        self.assertOutcome(result, "deferred", 451, "4.4.1")
        self.assertEqual(result.text, "connection refused by [::1]:%d" % port)

    @defer.inlineCallbacks
    def test_never_errbacks(self):
        """Even a bug (here: no route at all) becomes deferred results, and is logged."""
        results = yield self.deliverer().deliver(None, [Hop("x", LOOPBACK, 1)], SENDER,
                                                 ["a@d.test", "b@d.test"], MESSAGE)
        self.assertEqual([r.outcome for r in results], ["deferred", "deferred"])
        self.assertEqual(results[0].status, "4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    @defer.inlineCallbacks
    def test_address_literal_and_utf8_addresses(self):
        sink = self.sink()
        [result] = yield self.deliver(sink, sender="a@[127.0.0.1]", recipients=["pos@[127.0.0.1]"])
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["mail_from"], "a@[127.0.0.1]")


# --- C1: dot-stuffing across chunk boundaries -----------------------------------------------------


class C1DotStuffingTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def assertDelivered(self, sink, data):
        before = len(sink.messages)
        [result] = yield self.deliver(sink, data=data)
        self.assertOutcome(result, "delivered")
        self.assertEqual(len(sink.messages), before + 1, "a smuggled second message arrived")
        message = sink.messages[-1]
        self.assertEqual(message["message"], data)
        self.assertEqual(message["data"] + b".\r\n", stuff(data))
        self.assertEqual(message["rcpt_to"], [RCPT])

    @defer.inlineCallbacks
    def test_C1_dot_at_single_offsets(self):
        sink = self.sink()
        offsets = [0, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1]
        for offset in offsets:
            yield self.assertDelivered(sink, dot_message([offset], size=3 * CHUNK + 100))
        self.assertEqual(len(sink.messages), len(offsets))
        self.assertEqual(sink.connections, len(offsets))
        self.assertEqual(len(sink.transactions), len(offsets))

    @defer.inlineCallbacks
    def test_C1_dot_at_every_chunk_boundary(self):
        sink = self.sink()
        for delta in (-1, 0, 1):
            offsets = [k * CHUNK + delta for k in range(1, 9)]
            yield self.assertDelivered(sink, dot_message([0] + offsets, size=9 * CHUNK + 10))
        self.assertEqual(len(sink.transactions), 3)

    @defer.inlineCallbacks
    def test_C1_first_byte_is_a_dot(self):
        sink = self.sink()
        yield self.assertDelivered(sink, b".\r\n" + SMUGGLED)
        yield self.assertDelivered(sink, b"..two dots\r\nand more\r\n")
        self.assertTrue(sink.messages[0]["data"].startswith(b"..\r\n"))

    @defer.inlineCallbacks
    def test_C1_message_of_only_a_dot(self):
        sink = self.sink()
        yield self.assertDelivered(sink, b".\r\n")
        yield self.assertDelivered(sink, b"")


# --- C2: CRLF only --------------------------------------------------------------------------------


class C2LineEndingTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_C2_crlf_message_goes_out_unchanged(self):
        sink = self.sink()
        # Long enough that CRLF pairs straddle chunk boundaries too.
        data = b"Subject: crlf\r\n\r\n" + b"".join(b"line %05d\r\n" % i for i in range(8000))
        [result] = yield self.deliver(sink, data=data)
        self.assertOutcome(result, "delivered")
        [message] = sink.messages
        self.assertNotIn(b"\r\r\n", message["data"])
        self.assertEqual(message["data"], data)
        self.assertEqual(message["message"], data)

    @defer.inlineCallbacks
    def test_C2_bare_lf_and_cr_become_crlf(self):
        sink = self.sink()
        data = b"Subject: bare\n\nlf line\ncr line\rcrlf line\r\n.dot after lf\nno end"
        [result] = yield self.deliver(sink, data=data)
        self.assertOutcome(result, "delivered")
        [message] = sink.messages
        self.assertEqual(
            message["message"],
            b"Subject: bare\r\n\r\nlf line\r\ncr line\r\ncrlf line\r\n.dot after lf\r\nno end\r\n",
        )
        self.assertNotIn(b"\r\r\n", message["data"])
        wire = message["data"]
        self.assertEqual(wire.count(b"\n"), wire.count(b"\r\n"))
        self.assertEqual(wire.count(b"\r"), wire.count(b"\r\n"))

    @defer.inlineCallbacks
    def test_C2_headers_untouched(self):
        sink = self.sink()
        data = (b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"
                b"Subject:  spaced  \r\n\r\nbody\r\n")
        yield self.deliver(sink, data=data)
        self.assertEqual(sink.messages[0]["message"], data)


# --- C3: STARTTLS response injection ------------------------------------------------------------


class C3InjectionTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def assertInjectionRefused(self, policy):
        ca, _ = self.ca()
        sink = self.tls_sink(
            hostname=LOOPBACK, ca=ca,
            inject_after_starttls=b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        other = self.tls_sink(hostname=LOOPBACK, ca=ca)
        deliverer = self.deliverer(TLSConfig(ca_file=ca.ca_path))
        events = self.events()
        [result] = yield self.deliver(sink, route=make_route(policy), deliverer=deliverer)
        self.assertOutcome(result, "deferred", 451, "4.7.0")
        self.assertIn("STARTTLS response injection", result.text)
        self.assertEqual(sink.connections, 1)  # no plaintext retry
        self.assertEqual(sink.messages, [])
        self.assertEqual(sink.transactions, [])
        commands = sink.commands_of(0)
        self.assertEqual(commands[-1], b"STARTTLS")  # nothing after it, in clear or otherwise
        self.assertFalse(any(e.get("event") == "tls_downgrade" for e in events))
        # The next hop is still tried.
        [result] = yield self.deliver([sink, other], route=make_route(policy), deliverer=deliverer)
        self.assertOutcome(result, "delivered")
        self.assertIsNotNone(result.tls)
        self.assertEqual(sink.connections, 2)
        self.assertEqual(sink.transactions, [])

    def test_C3_injection_opportunistic(self):
        return self.assertInjectionRefused("opportunistic")

    def test_C3_injection_required(self):
        return self.assertInjectionRefused("required")

    def test_C3_injection_verify(self):
        return self.assertInjectionRefused("verify")


# --- C4: no internal retries, timeouts ------------------------------------------------------------


class C4RetriesAndTimeoutsTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_C4_no_internal_retry(self):
        sink = self.sink(mail_reply=(451, "4.3.0 Try again later"))
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "deferred", 451, "4.3.0")
        self.assertEqual(result.text, "Try again later")
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_C4_no_internal_retry_after_drop(self):
        sink = self.sink(drop_after="EHLO")
        [result] = yield self.deliver(sink)
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_C4_command_timeout_greeting(self):
        sink = self.sink(hang=True)
        start = time.monotonic()
        [result] = yield self.deliver(sink, deliverer=self.deliverer(command_timeout=0.3))
        elapsed = time.monotonic() - start
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("timeout", result.text)
        self.assertIn("greeting", result.text)
        self.assertEqual(sink.connections, 1)
        self.assertTrue(0.25 <= elapsed < 3, elapsed)

    @defer.inlineCallbacks
    def test_C4_command_timeout_rcpt_fails_over(self):
        sink = self.sink(hang="RCPT")
        other = self.sink()
        [result] = yield self.deliver([sink, other], deliverer=self.deliverer(command_timeout=0.3))
        self.assertOutcome(result, "delivered")
        [result] = yield self.deliver(sink, deliverer=self.deliverer(command_timeout=0.3))
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("RCPT", result.text)

    @defer.inlineCallbacks
    def test_C4_data_timeout(self):
        """data_timeout bounds the transfer and the final reply, however long command_timeout is."""
        sink = self.sink(hang="DOT")
        start = time.monotonic()
        [result] = yield self.deliver(
            sink, deliverer=self.deliverer(command_timeout=20, data_timeout=0.3))
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("DATA", result.text)
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_C4_connect_timeout(self):
        """A listener whose backlog is full drops our SYN: the connect times out."""
        listener = socket.socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((LOOPBACK, port))
            self.addCleanup(s.close)
        start = time.monotonic()
        [result] = yield self.deliver(self.hop(port), deliverer=self.deliverer(connect_timeout=0.3))
        if result.text.startswith("connection refused"):
            raise self.skipTest("this kernel refuses instead of dropping SYNs on a full backlog")
        self.assertOutcome(result, "deferred", 451, "4.4.1")
        self.assertIn("timed out", result.text)
        self.assertLess(time.monotonic() - start, 5)

    def clock_delivery(self, **timeouts):
        """A delivery on a MemoryReactorClock: -> (clock, protocol, transport, results list)."""
        clock = MemoryReactorClock()
        config = DeliveryConfig(**dict(dict(connect_timeout=3.0, command_timeout=7.0,
                                            data_timeout=9.0, connection_cache_time=0.0),
                                       **timeouts))
        deliverer = Deliverer(clock, HOSTNAME, config, TLSConfig())
        results = []
        deliverer.deliver(make_route("none"), [Hop("h", LOOPBACK, 2525)], SENDER, [RCPT],
                          MESSAGE).addCallback(results.extend)
        [(host, port, factory, timeout, _)] = clock.tcpClients
        self.assertEqual((host, port, timeout), (LOOPBACK, 2525, 3.0))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)

        def lost():
            self.assertTrue(transport.disconnecting)
            reason = Failure(error.ConnectionAborted())
            protocol.connectionLost(reason)
            factory.clientConnectionLost(None, reason)

        return clock, protocol, transport, results, lost

    def test_C4_command_timeout_on_the_injected_reactor(self):
        clock, protocol, transport, results, lost = self.clock_delivery()
        clock.advance(6.9)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"220 hello\r\n")  # a reply restarts the clock
        self.assertTrue(transport.value().startswith(b"EHLO " + HOSTNAME.encode()))
        clock.advance(6.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        lost()
        [result] = results
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("EHLO", result.text)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_C4_data_timeout_on_the_injected_reactor(self):
        clock, protocol, transport, results, lost = self.clock_delivery(data_timeout=2.0)
        for reply in (b"220 hi", b"250 ok", b"250 ok", b"250 ok", b"354 go"):
            protocol.dataReceived(reply + b"\r\n")
        self.assertTrue(transport.value().endswith(b"DATA\r\n"))
        # The transport never pulls the data (a stalled peer); replies would keep the command
        # timer alive, data_timeout still ends it.
        clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        lost()
        [result] = results
        self.assertOutcome(result, "deferred", 451, "4.4.2")
        self.assertIn("not finished within 2s", result.text)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_C4_factory_retries_zero(self):
        from mailgate.delivery.client import DeliveryFactory

        factory = DeliveryFactory(
            reactor, HOSTNAME, Hop("x", LOOPBACK, 25), "none", make_route("none"), "", ["a@b"],
            b"", None, DeliveryConfig(command_timeout=7.0, connection_cache_time=0.0),
        )
        self.assertEqual(factory.retries, 0)
        self.assertEqual(factory.timeout, 7.0)
        protocol = factory.buildProtocol(None)
        self.assertEqual(protocol.callLater, reactor.callLater)
        self.assertEqual(protocol.timeout, 7.0)


# --- C5: TLS policy -------------------------------------------------------------------------------


class C5TLSPolicyTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_C5_opportunistic_handshake_failure_retries_plaintext(self):
        sink = self.tls_sink(starttls_garbage=True, per_connection=[{}])
        events = self.events()
        [result] = yield self.deliver(sink, route=make_route("opportunistic"))
        self.assertOutcome(result, "delivered")
        self.assertIsNone(result.tls)
        self.assertEqual(sink.connections, 2)
        self.assertEqual(sink.commands_of(0)[-1], b"STARTTLS")
        self.assertNotIn(b"STARTTLS", sink.commands_of(1))
        [message] = sink.messages
        self.assertEqual(message["connection"], 1)
        self.assertIsNone(message["tls"])
        self.assertEqual(message["message"], MESSAGE)
        downgrades = [e for e in events if e.get("event") == "tls_downgrade"]
        self.assertEqual(len(downgrades), 1)
        self.assertEqual(downgrades[0]["port"], sink.port)
        self.assertEqual(downgrades[0]["address"], LOOPBACK)

    @defer.inlineCallbacks
    def test_C5_opportunistic_handshake_timeout_retries_plaintext(self):
        sink = self.tls_sink(per_connection=[dict(hang="TLS")])
        events = self.events()
        [result] = yield self.deliver(
            sink, route=make_route("opportunistic"), deliverer=self.deliverer(command_timeout=0.3))
        self.assertOutcome(result, "delivered")
        self.assertIsNone(result.tls)
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len([e for e in events if e.get("event") == "tls_downgrade"]), 1)

    @defer.inlineCallbacks
    def test_C5_required_handshake_timeout(self):
        sink = self.tls_sink(hang="TLS")
        [result] = yield self.deliver(
            sink, route=make_route("required"), deliverer=self.deliverer(command_timeout=0.3))
        self.assertOutcome(result, "deferred", 451, "4.7.5")
        self.assertIn("timed out", result.text)
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_C5_opportunistic_without_verification(self):
        """Any certificate will do (here: one for another name, from a CA nobody trusts)."""
        sink = self.tls_sink(hostname="other.example.test")
        [result] = yield self.deliver(sink, route=make_route("opportunistic"))
        self.assertOutcome(result, "delivered")
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(sink.messages[0]["tls"], result.tls)
        self.assertEqual(sink.connections, 1)
        # RFC 3207: EHLO again inside TLS.
        self.assertEqual(sink.messages[0]["helo"], HOSTNAME)

    @defer.inlineCallbacks
    def test_C5_opportunistic_not_offered_is_plaintext(self):
        sink = self.sink()
        [result] = yield self.deliver(sink, route=make_route("opportunistic"))
        self.assertOutcome(result, "delivered")
        self.assertIsNone(result.tls)

    @defer.inlineCallbacks
    def test_C5_opportunistic_starttls_refused_continues_in_plaintext(self):
        sink = self.tls_sink(starttls_reply=(454, "4.7.0 TLS not available"))
        events = self.events()
        [result] = yield self.deliver(sink, route=make_route("opportunistic"))
        self.assertOutcome(result, "delivered")
        self.assertIsNone(result.tls)
        self.assertEqual(sink.connections, 1)
        self.assertTrue(any(e.get("event") == "tls_downgrade" for e in events))

    @defer.inlineCallbacks
    def test_C5_none_never_starttls(self):
        sink = self.tls_sink()
        [result] = yield self.deliver(sink, route=make_route("none"))
        self.assertOutcome(result, "delivered")
        self.assertIsNone(result.tls)
        self.assertNotIn(b"STARTTLS", sink.commands_of(0))

    @defer.inlineCallbacks
    def test_C5_required_not_offered(self):
        sink = self.sink()
        [result] = yield self.deliver(sink, route=make_route("required"))
        self.assertOutcome(result, "deferred", 451, "4.7.4")
        self.assertIn("STARTTLS", result.text)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sink.transactions, [])
        verbs = [line.split(b" ")[0] for line in sink.commands_of(0)]
        self.assertEqual(verbs, [b"EHLO", b"QUIT"])  # nothing sent

    @defer.inlineCallbacks
    def test_C5_required_not_offered_fails_over(self):
        first = self.sink()
        second = self.tls_sink()
        [result] = yield self.deliver([first, second], route=make_route("required"))
        self.assertOutcome(result, "delivered")
        self.assertIsNotNone(result.tls)
        self.assertEqual(first.transactions, [])

    @defer.inlineCallbacks
    def test_C5_required_unverified(self):
        sink = self.tls_sink(hostname="other.example.test")
        [result] = yield self.deliver(sink, route=make_route("required"))
        self.assertOutcome(result, "delivered")
        self.assertIsNotNone(result.tls)

    @defer.inlineCallbacks
    def test_C5_required_handshake_failure_no_plaintext(self):
        sink = self.tls_sink(starttls_garbage=True)
        [result] = yield self.deliver(sink, route=make_route("required"))
        self.assertOutcome(result, "deferred", 451, "4.7.5")
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sink.transactions, [])

    @defer.inlineCallbacks
    def test_C5_required_starttls_refused(self):
        sink = self.tls_sink(starttls_reply=(454, "4.7.0 TLS not available"))
        [result] = yield self.deliver(sink, route=make_route("required"))
        self.assertOutcome(result, "deferred", 451, "4.7.4")
        self.assertIn("454 4.7.0 TLS not available", result.text)
        self.assertEqual(sink.transactions, [])

    @defer.inlineCallbacks
    def test_C5_verify_wrong_hostname(self):
        ca, directory = self.ca()
        sink = self.tls_sink(hostname="wrong.example.test", ca=ca)
        events = self.events()
        tls_config = TLSConfig(ca_file=ca.ca_path)
        [result] = yield self.deliver(
            self.hop(sink, name="mx.example.test"), route=make_route("verify"),
            deliverer=self.deliverer(tls_config))
        self.assertOutcome(result, "deferred", 451, "4.7.5")
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sink.transactions, [])
        self.assertTrue(any("TLS with" in (e.get("log_format") or "") for e in events))

    @defer.inlineCallbacks
    def test_C5_verify_ip_hop_needs_ip_san(self):
        ca, directory = self.ca()
        sink = self.tls_sink(hostname="mx.example.test", ca=ca)
        [result] = yield self.deliver(
            sink, route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=ca.ca_path)))
        self.assertOutcome(result, "deferred", 451, "4.7.5")

    @defer.inlineCallbacks
    def test_C5_verify_untrusted_ca(self):
        ca, _ = self.ca()
        other, _ = self.ca()
        sink = self.tls_sink(hostname=LOOPBACK, ca=ca)
        [result] = yield self.deliver(
            sink, route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=other.ca_path)))
        self.assertOutcome(result, "deferred", 451, "4.7.5")
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_C5_verify_ip_name(self):
        ca, _ = self.ca()
        sink = self.tls_sink(hostname=LOOPBACK, ca=ca)
        [result] = yield self.deliver(
            sink, route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=ca.ca_path)))
        self.assertOutcome(result, "delivered")
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(sink.messages[0]["tls"], result.tls)
        self.assertEqual(sink.messages[0]["message"], MESSAGE)

    @defer.inlineCallbacks
    def test_C5_verify_dns_name(self):
        ca, _ = self.ca()
        sink = self.tls_sink(hostname="mx.example.test", ca=ca)
        [result] = yield self.deliver(
            self.hop(sink, name="mx.example.test"), route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=ca.ca_path)))
        self.assertOutcome(result, "delivered")
        self.assertIsNotNone(result.tls)

    @defer.inlineCallbacks
    def test_C5_verify_falls_over_to_next_hop(self):
        ca, _ = self.ca()
        bad = self.tls_sink(hostname="wrong.example.test", ca=ca)
        good = self.tls_sink(hostname=LOOPBACK, ca=ca)
        [result] = yield self.deliver(
            [bad, good], route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=ca.ca_path)))
        self.assertOutcome(result, "delivered")
        self.assertEqual(result.remote, self.hop(good))

    @defer.inlineCallbacks
    def test_client_certificate_offered(self):
        ca, _ = self.ca()
        cert, key = ca.issue("gw.test.example", self.mktemp(), name="client")
        sink = self.tls_sink(hostname=LOOPBACK, ca=ca, client_ca=ca.ca_path)
        tls_config = TLSConfig(certificate=cert, private_key=key, ca_file=ca.ca_path)
        for policy in ("opportunistic", "verify"):
            [result] = yield self.deliver(
                sink, route=make_route(policy), deliverer=self.deliverer(tls_config))
            self.assertOutcome(result, "delivered")
        self.assertEqual([m["client_cert"] for m in sink.messages], ["gw.test.example"] * 2)

    @defer.inlineCallbacks
    def test_missing_ca_file_defers(self):
        sink = self.tls_sink()
        [result] = yield self.deliver(
            sink, route=make_route("verify"),
            deliverer=self.deliverer(TLSConfig(ca_file=self.mktemp())))
        self.assertOutcome(result, "deferred", 451, "4.3.5")
        self.assertEqual(sink.connections, 0)


# --- AUTH ----------------------------------------------------------------------------------------


class AuthTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_auth_over_tls(self):
        for mechanisms in ("PLAIN LOGIN", "LOGIN"):
            sink = self.tls_sink(auth=("relay", "s3cret"), auth_mechanisms=mechanisms)
            [result] = yield self.deliver(
                sink, route=make_route("required", username="relay", password="s3cret"))
            self.assertOutcome(result, "delivered")
            [message] = sink.messages
            self.assertEqual(message["auth"], ("relay", "s3cret"))
            self.assertIsNotNone(message["tls"])
            self.assertEqual(len(sink.auth_attempts), 1)
            verb = sink.commands_of(0)[-5].split(b" ")[:2]
            self.assertEqual(verb, [b"AUTH", mechanisms.split()[0].encode()], sink.commands)

    @defer.inlineCallbacks
    def test_auth_opportunistic_over_tls(self):
        sink = self.tls_sink(auth=("relay", "s3cret"), auth_needs_tls=True)
        [result] = yield self.deliver(
            sink, route=make_route("opportunistic", username="relay", password="s3cret"))
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["auth"], ("relay", "s3cret"))

    @defer.inlineCallbacks
    def test_auth_without_tls_sends_no_credentials(self):
        sink = self.sink(auth=True)  # AUTH offered in clear, no STARTTLS
        [result] = yield self.deliver(
            sink, route=make_route("opportunistic", username="relay", password="s3cret"))
        self.assertOutcome(result, "deferred", 451, "4.7.10")
        self.assertEqual(sink.auth_attempts, [])
        self.assertFalse(any(b"AUTH" in line for _, line in sink.commands))
        self.assertFalse(any(b"s3cret" in line for _, line in sink.commands))
        self.assertEqual(sink.transactions, [])
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_auth_tls_none_sends_no_credentials(self):
        sink = self.tls_sink(auth=True)
        [result] = yield self.deliver(
            sink, route=make_route("none", username="relay", password="s3cret"))
        self.assertOutcome(result, "deferred", 451, "4.7.10")
        self.assertEqual(sink.auth_attempts, [])

    @defer.inlineCallbacks
    def test_auth_handshake_failure_no_plaintext_retry(self):
        sink = self.tls_sink(auth=True, starttls_garbage=True)
        [result] = yield self.deliver(
            sink, route=make_route("opportunistic", username="relay", password="s3cret"))
        self.assertOutcome(result, "deferred", 451, "4.7.5")
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sink.auth_attempts, [])

    @defer.inlineCallbacks
    def test_auth_failure_is_temporary(self):
        sink = self.tls_sink(auth=("relay", "right"))
        other = self.tls_sink(auth=("relay", "wrong"))
        events = self.events()
        [result] = yield self.deliver(
            sink, route=make_route("required", username="relay", password="wrong"))
        self.assertOutcome(result, "deferred", 451, "4.7.8")
        self.assertIn("535", result.text)
        self.assertEqual(len(sink.auth_attempts), 1)  # the password is not sent twice
        self.assertEqual(sink.transactions, [])
        logged = [e for e in events if "Authentication as" in (e.get("log_format") or "")]
        self.assertEqual(len(logged), 1)
        self.assertNotIn("wrong", repr({k: v for k, v in logged[0].items() if k != "log_logger"}))
        # and the next hop is tried
        [result] = yield self.deliver(
            [sink, other], route=make_route("required", username="relay", password="wrong"))
        self.assertOutcome(result, "delivered")

    @defer.inlineCallbacks
    def test_auth_not_offered(self):
        sink = self.tls_sink()
        [result] = yield self.deliver(
            sink, route=make_route("required", username="relay", password="s3cret"))
        self.assertOutcome(result, "deferred", 451, "4.7.0")
        self.assertEqual(sink.transactions, [])


# --- protocol events -----------------------------------------------------------------------------


class ProtocolEventTests(DeliveryTestCase):
    """Every outbound SMTP session on the event bus: commands, replies, TLS; no secrets, no body."""

    def bus(self):
        from mailgate.events import EventBus

        bus = EventBus(reactor)
        seen = []
        bus.subscribe(lambda kind, fields: seen.append((kind, dict(fields))))
        return bus, seen

    def deliver_with_events(self, hops, route=None, data=MESSAGE):
        bus, seen = self.bus()
        config = DeliveryConfig(connect_timeout=5.0, command_timeout=5.0, data_timeout=10.0,
                                connection_cache_time=0.0)
        deliverer = Deliverer(reactor, HOSTNAME, config, TLSConfig(), events=bus)
        d = self.deliver(hops, route=route, deliverer=deliverer, data=data)
        return d.addCallback(lambda results: (results, [f for k, f in seen if k == "protocol"]))

    def assertNoSecrets(self, events, *secrets):
        import base64

        text = repr(events)
        for secret in secrets:
            self.assertNotIn(secret, text)
            self.assertNotIn(base64.b64encode(secret.encode()).decode(), text)

    @defer.inlineCallbacks
    def test_plain_session(self):
        sink = self.sink()
        [result], events = yield self.deliver_with_events(sink)
        self.assertOutcome(result, "delivered")
        [session] = {e["session"] for e in events}
        self.assertRegex(session, "^[0-9a-f]{12}$")
        self.assertEqual(result.session, session)  # tracking events can name the session
        for e in events:
            self.assertEqual(e["route"], "test")
            self.assertEqual(e["direction"], "out")
            self.assertEqual(e["remote"], "%s:%d" % (LOOPBACK, sink.port))
            self.assertTrue(e["local"].startswith(LOOPBACK + ":"), e)
            self.assertIn("time", e)
            self.assertNotIn("listener", e)
        steps = [(e["event"], e["data"].split("\n")[0][:14]) for e in events]
        self.assertEqual(steps, [
            ("connect", ("%s:%d tls" % (LOOPBACK, sink.port))[:14]),
            ("reply", "220 sink.test "),
            ("command", "EHLO " + HOSTNAME[:9]),
            ("reply", "250-sink.test "),
            ("command", "MAIL FROM:<sen"),
            ("reply", "250 2.1.0 Ok"),
            ("command", "RCPT TO:<user@"),
            ("reply", "250 2.1.5 Ok"),
            ("command", "DATA"),
            ("reply", "354 End data w"),
            ("reply", "250 2.0.0 Ok: "),
            ("command", "QUIT"),
            ("reply", "221 2.0.0 Bye"),
            ("disconnect", ""),
        ])
        self.assertEqual(events[0]["data"], "%s:%d tls=opportunistic" % (LOOPBACK, sink.port))
        self.assertIsNone(events[0]["message_id"])  # MESSAGE has no Message-ID
        self.assertEqual(events[4]["data"], "MAIL FROM:<%s>" % SENDER)
        self.assertEqual(events[6]["data"], "RCPT TO:<%s>" % RCPT)
        ehlo = events[3]["data"].split("\n")
        self.assertGreater(len(ehlo), 1)  # a multi-line reply is one event
        self.assertTrue(all(line[:4] == "250-" for line in ehlo[:-1]), ehlo)
        self.assertEqual(ehlo[-1][:4], "250 ")
        # The message never appears, only the DATA command and the replies.
        self.assertNotIn("Hello there", repr(events))
        self.assertNotIn("starts with a dot", repr(events))

    @defer.inlineCallbacks
    def test_message_id_on_connect(self):
        sink = self.sink()
        data = b"Message-ID: <abc.123@origin.test>\r\n" + MESSAGE
        [result], events = yield self.deliver_with_events(sink, data=data)
        self.assertOutcome(result, "delivered")
        self.assertEqual(events[0]["event"], "connect")
        self.assertEqual(events[0]["message_id"], "<abc.123@origin.test>")
        self.assertEqual([e for e in events[1:] if "message_id" in e], [])

    @defer.inlineCallbacks
    def test_tls_and_auth_plain_masked(self):
        sink = self.tls_sink(auth=("relay", "s3cret"))
        route = make_route("required", username="relay", password="s3cret")
        [result], events = yield self.deliver_with_events(sink, route=route)
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["auth"], ("relay", "s3cret"))  # really sent
        kinds = [e["event"] for e in events]
        self.assertEqual(kinds.count("tls"), 1)
        tls = events[kinds.index("tls")]
        self.assertRegex(tls["data"], r"^TLSv1\.[23] \S+$")
        # EHLO is handed to the TLS layer at once; it goes out when the handshake is done.
        before = [(e["event"], e["data"][:8]) for e in events[kinds.index("tls") - 3:]][:3]
        self.assertEqual(before, [("command", "STARTTLS"), ("reply", "220 2.0."),
                                  ("command", "EHLO gw.")])
        commands = [e["data"] for e in events if e["event"] == "command"]
        self.assertIn("AUTH PLAIN ****", commands)
        self.assertEqual(len([c for c in commands if c.startswith("EHLO")]), 2)
        self.assertNoSecrets(events, "s3cret", "\0relay\0s3cret")
        auth = commands.index("AUTH PLAIN ****")
        self.assertTrue(commands[auth + 1].startswith("MAIL FROM:"), commands)  # unmasked again

    @defer.inlineCallbacks
    def test_auth_login_responses_masked(self):
        sink = self.tls_sink(auth=("relay", "s3cret"), auth_mechanisms="LOGIN")
        route = make_route("required", username="relay", password="s3cret")
        [result], events = yield self.deliver_with_events(sink, route=route)
        self.assertOutcome(result, "delivered")
        dialogue = [(e["event"], e["data"]) for e in events if e["event"] in ("command", "reply")]
        at = dialogue.index(("command", "AUTH LOGIN"))
        self.assertEqual(dialogue[at:at + 6], [
            ("command", "AUTH LOGIN"),
            ("reply", "334 VXNlcm5hbWU6"),
            ("command", "****"),
            ("reply", "334 UGFzc3dvcmQ6"),
            ("command", "****"),
            ("reply", "235 2.7.0 Authentication successful"),
        ])
        self.assertEqual(dialogue[at + 6], ("command", "MAIL FROM:<%s>" % SENDER))
        self.assertNoSecrets(events, "s3cret")
        self.assertNotIn("cmVsYXk=", repr(events))  # base64 of the username too

    @defer.inlineCallbacks
    def test_refused_auth_masked(self):
        sink = self.tls_sink(auth=("relay", "right"))
        route = make_route("required", username="relay", password="wrong")
        [result], events = yield self.deliver_with_events(sink, route=route)
        self.assertOutcome(result, "deferred", 451, "4.7.8")
        replies = [e["data"] for e in events if e["event"] == "reply"]
        self.assertIn("535 5.7.8 Authentication credentials invalid", replies)
        commands = [e["data"] for e in events if e["event"] == "command"]
        self.assertEqual(commands[-2:], ["AUTH PLAIN ****", "QUIT"])
        self.assertNoSecrets(events, "wrong", "\0relay\0wrong")

    @defer.inlineCallbacks
    def test_a_session_per_connection(self):
        first = self.sink(banner=(421, "4.3.2 busy"))
        second = self.sink()
        [result], events = yield self.deliver_with_events([first, second])
        self.assertOutcome(result, "delivered")
        sessions = list(dict.fromkeys(e["session"] for e in events))
        self.assertEqual(len(sessions), 2)
        one = [e for e in events if e["session"] == sessions[0]]
        two = [e for e in events if e["session"] == sessions[1]]
        self.assertEqual(one[0]["remote"], "%s:%d" % (LOOPBACK, first.port))
        self.assertEqual(two[0]["remote"], "%s:%d" % (LOOPBACK, second.port))
        self.assertEqual([(e["event"], e["data"]) for e in one[:3]], [
            ("connect", "%s:%d tls=opportunistic" % (LOOPBACK, first.port)),
            ("reply", "421 4.3.2 busy"),
            ("command", "QUIT"),
        ])
        # The server closes after its 421: our QUIT meets a FIN or a RST, either is reported.
        self.assertEqual([e["event"] for e in one[3:]], ["disconnect"])
        self.assertEqual(two[-1]["event"], "disconnect")

    @defer.inlineCallbacks
    def test_plaintext_retry_is_a_new_session(self):
        sink = self.tls_sink(starttls_garbage=True)
        [result], events = yield self.deliver_with_events(sink)
        self.assertOutcome(result, "delivered")
        sessions = list(dict.fromkeys(e["session"] for e in events))
        self.assertEqual(len(sessions), 2)
        first = [e for e in events if e["session"] == sessions[0]]
        self.assertEqual(first[-1]["event"], "disconnect")
        self.assertNotEqual(first[-1]["data"], "")  # why: the handshake failed
        self.assertNotIn("tls", [e["event"] for e in events])
        self.assertNotIn("STARTTLS", [e["data"] for e in events if e["session"] == sessions[1]])

    @defer.inlineCallbacks
    def test_no_bus_no_events(self):
        sink = self.sink()
        deliverer = self.deliverer()
        self.assertIsNone(deliverer.events)
        [result] = yield self.deliver(sink, deliverer=deliverer)
        self.assertOutcome(result, "delivered")
