"""mailgate.smtp.anvil: connection counts, token buckets and failed-login windows on a Clock."""

import types

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgate.smtp.anvil import Anvil, FailureWindows, Rate, TokenBuckets, client_key


def limits(**overrides):
    values = dict(max_connections=1000, max_connections_per_ip=20, connection_rate_per_ip=None,
                  max_auth_failures_per_ip=10, max_auth_failures_per_user=20,
                  auth_failure_window=600.0)
    values.update(overrides)
    return types.SimpleNamespace(**values)


class ClientKeyTests(SynchronousTestCase):
    def test_ipv4_is_itself(self):
        self.assertEqual(client_key("192.0.2.7"), "192.0.2.7")

    def test_ipv6_counts_per_64(self):
        self.assertEqual(client_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("2001:db8:1:2:ffff::9"), client_key("2001:db8:1:2::1"))
        self.assertNotEqual(client_key("2001:db8:1:3::1"), client_key("2001:db8:1:2::1"))

    def test_mapped_ipv4_is_the_ipv4_address(self):
        self.assertEqual(client_key("::ffff:192.0.2.7"), "192.0.2.7")


class TokenBucketTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.buckets = TokenBuckets(self.clock)

    def test_burst_then_refill(self):
        rate = Rate(3, 60.0)
        self.assertEqual([self.buckets.take("k", rate) for _ in range(4)], [True, True, True, False])
        self.clock.advance(19.9)
        self.assertFalse(self.buckets.take("k", rate))
        self.clock.advance(0.2)  # one token per 20 s
        self.assertTrue(self.buckets.take("k", rate))
        self.assertFalse(self.buckets.take("k", rate))

    def test_refused_take_spends_nothing(self):
        rate = Rate(10, 10.0)
        self.assertTrue(self.buckets.take("k", rate, 8))
        self.assertFalse(self.buckets.take("k", rate, 5))
        self.assertTrue(self.buckets.take("k", rate, 2))

    def test_keys_are_separate(self):
        rate = Rate(1, 60.0)
        self.assertTrue(self.buckets.take("a", rate))
        self.assertTrue(self.buckets.take("b", rate))
        self.assertFalse(self.buckets.take("a", rate))

    def test_refilled_buckets_are_forgotten(self):
        rate = Rate(2, 10.0)
        self.buckets.take("a", rate)
        self.buckets.take("b", rate)
        self.assertEqual(len(self.buckets), 2)
        self.clock.advance(5)
        self.buckets.expire()
        self.assertEqual(len(self.buckets), 0)

    def test_table_is_bounded(self):
        buckets = TokenBuckets(self.clock, max_entries=100)
        rate = Rate(1, 3600.0)
        for i in range(1000):
            buckets.take("client%d" % i, rate)
        self.assertEqual(len(buckets), 100)
        # The most recent clients are the ones remembered.
        self.assertFalse(buckets.take("client999", rate))


class FailureWindowTests(SynchronousTestCase):
    def test_sliding_window(self):
        clock = Clock()
        windows = FailureWindows(clock)
        for _ in range(3):
            windows.add("k", 5)
            clock.advance(10)
        self.assertEqual(windows.count("k", 600), 3)
        clock.advance(575)  # the first failure is now 605 s old
        self.assertEqual(windows.count("k", 600), 2)
        clock.advance(30)
        self.assertEqual(windows.count("k", 600), 0)
        self.assertEqual(len(windows), 0)

    def test_keeps_only_as_many_as_the_limit(self):
        clock = Clock()
        windows = FailureWindows(clock)
        for _ in range(1000):
            windows.add("k", 10)
        self.assertEqual(windows.count("k", 600), 10)


class AnvilTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.anvil = Anvil(self.clock)

    def test_per_ip_connection_limit(self):
        lim = limits(max_connections_per_ip=2)
        self.assertEqual([self.anvil.connect("192.0.2.1", lim) for _ in range(3)],
                         [None, None, "max_connections_per_ip"])
        self.assertIsNone(self.anvil.connect("192.0.2.2", lim))
        self.anvil.disconnect("192.0.2.1")
        self.assertIsNone(self.anvil.connect("192.0.2.1", lim))
        self.assertEqual(self.anvil.connections, 3)

    def test_ipv6_neighbours_share_the_limit(self):
        lim = limits(max_connections_per_ip=2)
        self.assertIsNone(self.anvil.connect("2001:db8::1", lim))
        self.assertIsNone(self.anvil.connect("2001:db8::2", lim))
        self.assertEqual(self.anvil.connect("2001:db8::ffff", lim), "max_connections_per_ip")

    def test_gateway_connection_limit(self):
        lim = limits(max_connections=3)
        for i in range(3):
            self.assertIsNone(self.anvil.connect("192.0.2.%d" % i, lim))
        self.assertEqual(self.anvil.connect("192.0.2.200", lim), "max_connections")

    def test_connection_rate(self):
        lim = limits(connection_rate_per_ip=Rate(2, 60.0))
        results = []
        for _ in range(3):
            results.append(self.anvil.connect("192.0.2.1", lim))
        self.assertEqual(results, [None, None, "connection_rate_per_ip"])
        self.assertEqual(self.anvil.connections, 2)  # the refused one was not counted

    def test_disconnect_forgets_idle_clients(self):
        lim = limits()
        self.anvil.connect("192.0.2.1", lim)
        self.anvil.disconnect("192.0.2.1")
        self.assertEqual(self.anvil.open_from("192.0.2.1"), 0)
        self.assertEqual(len(self.anvil._per_client), 0)

    def test_rates_per_ip_and_per_user(self):
        rate = Rate(2, 60.0)
        self.assertTrue(self.anvil.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertTrue(self.anvil.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertFalse(self.anvil.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertTrue(self.anvil.take("message_rate_per_user", "Alice@example.com", rate, 2))
        self.assertFalse(self.anvil.take("message_rate_per_user", "alice@EXAMPLE.com", rate))
        self.assertTrue(self.anvil.take("recipient_rate_per_ip", "192.0.2.1", None, 1000))

    def test_auth_failures_per_ip_and_per_user(self):
        lim = limits(max_auth_failures_per_ip=3, max_auth_failures_per_user=5)
        for i in range(3):
            self.assertIsNone(self.anvil.auth_blocked("192.0.2.1", "bob", lim))
            self.anvil.auth_failed("192.0.2.1", "bob", lim)
        self.assertEqual(self.anvil.auth_blocked("192.0.2.1", "alice", lim), "max_auth_failures_per_ip")
        # Credential stuffing against one account from many addresses.
        for i in range(2):
            self.anvil.auth_failed("198.51.100.%d" % i, "BOB", lim)
        self.assertEqual(self.anvil.auth_blocked("203.0.113.9", "bob", lim), "max_auth_failures_per_user")
        self.assertIsNone(self.anvil.auth_blocked("203.0.113.9", "alice", lim))
        self.clock.advance(601)
        self.assertIsNone(self.anvil.auth_blocked("192.0.2.1", "bob", lim))


class SharedTests(SynchronousTestCase):
    """Two receiver processes' counters, joined as mailgate.processes joins them (through JSON)."""

    def setUp(self):
        import json

        self.clock = Clock()
        self.a, self.b = Anvil(self.clock), Anvil(self.clock)
        self.a.share(lambda op: self.b.apply("a", json.loads(json.dumps(op))))
        self.b.share(lambda op: self.a.apply("b", json.loads(json.dumps(op))))

    def test_connections_per_ip_count_in_every_process(self):
        lim = limits(max_connections_per_ip=2)
        self.assertIsNone(self.a.connect("192.0.2.1", lim))
        self.assertIsNone(self.b.connect("192.0.2.1", lim))
        self.assertEqual(self.a.connect("192.0.2.1", lim), "max_connections_per_ip")
        self.assertEqual(self.b.connect("192.0.2.1", lim), "max_connections_per_ip")
        self.a.disconnect("192.0.2.1")
        self.assertIsNone(self.b.connect("192.0.2.1", lim))
        self.assertEqual((self.a.connections, self.b.connections), (2, 2))

    def test_a_gone_process_no_longer_counts(self):
        lim = limits(max_connections=2)
        self.a.connect("192.0.2.1", lim)
        self.a.connect("192.0.2.2", lim)
        self.assertEqual(self.b.connect("192.0.2.3", lim), "max_connections")
        self.b.forget("a")  # killed with its sessions open: it will never say disconnect
        self.assertEqual(self.b.connections, 0)
        self.assertIsNone(self.b.connect("192.0.2.3", lim))
        self.assertEqual(self.b.open_from("192.0.2.1"), 0)

    def test_rates_are_spent_in_every_process(self):
        rate = Rate(3, 60.0)
        self.assertTrue(self.a.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertTrue(self.b.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertTrue(self.a.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertFalse(self.b.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertFalse(self.a.take("message_rate_per_ip", "192.0.2.1", rate))
        self.clock.advance(20)  # one token back, in both
        self.assertTrue(self.b.take("message_rate_per_ip", "192.0.2.1", rate))
        self.assertFalse(self.a.take("message_rate_per_ip", "192.0.2.1", rate))

    def test_failed_logins_block_in_every_process(self):
        lim = limits(max_auth_failures_per_ip=2, max_auth_failures_per_user=20)
        self.a.auth_failed("192.0.2.1", "Alice", lim)
        self.assertIsNone(self.b.auth_blocked("192.0.2.1", None, lim))
        self.b.auth_failed("192.0.2.1", "alice", lim)
        self.assertEqual(self.a.auth_blocked("192.0.2.1", None, lim), "max_auth_failures_per_ip")
        self.assertEqual(self.b.auth_blocked("192.0.2.1", None, lim), "max_auth_failures_per_ip")

    def test_what_a_peer_cannot_mean_is_ignored(self):
        lim = limits(max_connections=5)
        for op in ([], ["x"], ["c"], ["t", "n", "k", "many", 1, 1], ["f"], "c", None):
            self.assertFalse(self.a.apply("b", op))
        self.assertFalse(self.a.apply("b", ["d", "192.0.2.1"]))  # never counted: no underflow
        self.assertEqual(self.a.connections, 0)
        self.assertIsNone(self.a.connect("192.0.2.1", lim))
