"""
Outbound connection reuse: mailgate.delivery.conncache on a Clock, and the Deliverer keeping a
connection open for the next message to a real sink on loopback.
"""

import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate.config import DeliveryConfig, TLSConfig
from mailgate.delivery.client import Deliverer
from mailgate.delivery.conncache import ConnectionCache
from mailgate.envelope import Hop

from tests.delivery.test_client import HOSTNAME, LOOPBACK, MESSAGE, RCPT, SENDER, make_route
from tests.sinks import Sink


class _FastClock:
    """The reactor, but its clock moves on a second each time it is read."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._reads = 0

    def seconds(self):
        self._reads += 1
        return self._reactor.seconds() + self._reads

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class FakeConnection:
    def __init__(self, born=0.0):
        self.born = born
        self.closed = False
        self.alive = True

    def usable(self):
        return self.alive

    def closeIdle(self):
        self.closed = True


class CacheTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.cache = ConnectionCache(self.clock, idle_time=2.0, max_age=300.0, max_per_key=2)

    def test_take_what_was_parked(self):
        c = FakeConnection()
        self.assertTrue(self.cache.park("k", c))
        self.assertIsNone(self.cache.take("other"))
        self.assertIs(self.cache.take("k"), c)
        self.assertIsNone(self.cache.take("k"))
        self.clock.advance(10)
        self.assertFalse(c.closed)  # taken: its idle timer is gone
        self.assertEqual(self.cache.reused, 1)

    def test_idle_connection_closes_after_idle_time(self):
        c = FakeConnection()
        self.cache.park("k", c)
        self.clock.advance(1.9)
        self.assertFalse(c.closed)
        self.clock.advance(0.2)
        self.assertTrue(c.closed)
        self.assertIsNone(self.cache.take("k"))
        self.assertEqual(len(self.cache), 0)

    def test_old_connections_are_not_parked(self):
        self.clock.advance(301)
        self.assertFalse(self.cache.park("k", FakeConnection(born=0.0)))
        self.assertTrue(self.cache.park("k", FakeConnection(born=2.0)))

    def test_bounded_per_key(self):
        self.assertTrue(self.cache.park("k", FakeConnection()))
        self.assertTrue(self.cache.park("k", FakeConnection()))
        self.assertFalse(self.cache.park("k", FakeConnection()))
        self.assertTrue(self.cache.park("j", FakeConnection()))

    def test_dead_connections_are_skipped(self):
        dead, alive = FakeConnection(), FakeConnection()
        self.cache.park("k", alive)
        self.cache.park("k", dead)
        dead.alive = False
        self.assertIs(self.cache.take("k"), alive)

    def test_discard_and_close_all(self):
        a, b = FakeConnection(), FakeConnection()
        self.cache.park("k", a)
        self.cache.park("j", b)
        self.cache.discard(a)
        self.assertIsNone(self.cache.take("k"))
        self.cache.close_all()
        self.assertTrue(b.closed and not a.closed)
        self.assertEqual(len(self.cache), 0)

    def test_off(self):
        cache = ConnectionCache(self.clock, idle_time=0.0, max_age=300.0)
        self.assertFalse(cache.park("k", FakeConnection()))


class ReuseTests(TestCase):
    timeout = 30

    def sink(self, **behaviour):
        sink = Sink(**behaviour)
        sink.start()
        self.addCleanup(lambda: self.assertEqual(sink.errors, []))
        self.addCleanup(sink.stop)
        return sink

    def deliverer(self, clock=reactor, **delivery):
        values = dict(connect_timeout=5.0, command_timeout=5.0, data_timeout=10.0,
                      connection_cache_time=5.0)
        values.update(delivery)
        deliverer = Deliverer(clock, HOSTNAME, DeliveryConfig(**values), TLSConfig())
        self.addCleanup(deliverer.close)
        return deliverer

    @defer.inlineCallbacks
    def deliver_twice(self, sink, deliverer, between=None):
        hop = Hop(LOOPBACK, LOOPBACK, sink.port)
        first = yield deliverer.deliver(make_route("none"), [hop], SENDER, [RCPT], MESSAGE)
        if between is not None:
            yield between()
        second = yield deliverer.deliver(make_route("none"), [hop], SENDER, ["two@example.org"],
                                         MESSAGE)
        return first + second

    def wait(self, predicate, timeout=10.0):
        """Poll predicate on the reactor (the sink runs in threads) until true or timeout."""
        deadline = time.monotonic() + timeout
        d = defer.Deferred()

        def check():
            if predicate():
                d.callback(None)
            elif time.monotonic() > deadline:
                d.errback(AssertionError("condition not met within %gs" % timeout))
            else:
                reactor.callLater(0.02, check)

        check()
        return d

    @defer.inlineCallbacks
    def test_next_message_goes_over_the_same_connection(self):
        sink = self.sink()
        deliverer = self.deliverer()
        results = yield self.deliver_twice(sink, deliverer)
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual(sink.connections, 1)
        self.assertEqual([m["rcpt_to"] for m in sink.messages], [[RCPT], ["two@example.org"]])
        verbs = [line.split(b" ")[0].rstrip(b"\r\n") for line in sink.commands_of(0)]
        self.assertEqual(verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(results[0].session, results[1].session)
        self.assertEqual(deliverer.cache.reused, 1)

    @defer.inlineCallbacks
    def test_idle_connection_says_quit(self):
        sink = self.sink()
        deliverer = self.deliverer(connection_cache_time=0.2)
        hop = Hop(LOOPBACK, LOOPBACK, sink.port)
        yield deliverer.deliver(make_route("none"), [hop], SENDER, [RCPT], MESSAGE)
        yield self.wait(lambda: sink.commands and sink.commands[-1][1].startswith(b"QUIT"))
        self.assertEqual(len(deliverer.cache), 0)

    @defer.inlineCallbacks
    def test_off_means_a_connection_per_message(self):
        sink = self.sink()
        results = yield self.deliver_twice(sink, self.deliverer(connection_cache_time=0.0))
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_server_closing_an_idle_connection(self):
        """The server hangs up after each message: the next one gets a new connection."""
        sink = self.sink(hangup_after_messages=1)
        deliverer = self.deliverer()
        results = yield self.deliver_twice(
            sink, deliverer, between=lambda: self.wait(lambda: len(deliverer.cache) == 0))
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_stale_connection_is_retried_at_once_on_a_new_one(self):
        """The server let the kept connection go: MAIL gets no reply; a new connection delivers."""
        sink = self.sink(drop_after_messages=1)
        deliverer = self.deliverer()
        results = yield self.deliver_twice(sink, deliverer)
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"], results)
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len(sink.messages), 2)

    @defer.inlineCallbacks
    def test_failed_transaction_is_not_reused(self):
        """A refused RCPT for every recipient leaves a transaction open: that connection quits."""
        sink = self.sink(rcpt_default=(550, "5.1.1 No such user"))
        results = yield self.deliver_twice(sink, self.deliverer())
        self.assertEqual([r.outcome for r in results], ["bounced", "bounced"])
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_temporary_failure_at_end_of_data_is_not_reused(self):
        """
        A server that said "try again later" to the message gets a new connection for the next:
        retried over the same session, a deferred message could meet the same trouble for as
        long as the connection lives (connection_reuse_time), however short its retry interval.
        """
        sink = self.sink(data_reply=(451, "4.3.0 Try again later"))
        results = yield self.deliver_twice(sink, self.deliverer())
        self.assertEqual([r.outcome for r in results], ["deferred", "deferred"])
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_permanent_failure_at_end_of_data_keeps_the_connection(self):
        """A 5xx to one message is about that message: the next one may use the connection."""
        sink = self.sink(data_reply=(554, "5.6.0 Content rejected"))
        results = yield self.deliver_twice(sink, self.deliverer())
        self.assertEqual([r.outcome for r in results], ["bounced", "bounced"])
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_old_connection_is_not_kept(self):
        sink = self.sink()
        # A second passes each time the deliverer reads the clock: the connection is older than
        # connection_reuse_time when its first transaction ends, however fast loopback is.
        deliverer = self.deliverer(clock=_FastClock(reactor), connection_reuse_time=1.5)
        results = yield self.deliver_twice(sink, deliverer)
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual(sink.connections, 2)
