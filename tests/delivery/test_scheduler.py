"""
The delivery scheduler on a real spool (synchronous disk runner), a fake router and deliverer,
and an injected clock: retries, expiry, bounces, delay warnings, crash recovery, concurrency.
"""

import email
import email.policy

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.config import DeliveryConfig, GatewayConfig, RouteConfig
from mailgate.envelope import Envelope, Hop, RecipientResult
from mailgate.errors import RoutingError
from mailgate.queue import Spool
from mailgate.delivery.scheduler import SWEEP_INTERVAL, DeliveryService, MessageState, retry_delay
from mailgate.errors import QueueUnavailable

MX_ROUTE = RouteConfig(name="internet", domains=("*",), mx=True, dkim_sign=True)
SMART = RouteConfig(name="internal", domains=("example.com",), smarthosts=(("127.0.0.1", 2526),))
BODY = b"From: a@sender.example\r\nSubject: test\r\n\r\nhello\r\n"


def sync(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeRouter:
    def __init__(self):
        self.errors = {}

    def route_for(self, domain):
        if domain == "noroute.example":
            return None
        return SMART if domain == "example.com" else MX_ROUTE

    def hops(self, route, domain):
        if domain in self.errors:
            return defer.fail(self.errors[domain])
        return defer.succeed([Hop("mx." + domain, "127.0.0.1", 25)])


class FakeDeliverer:
    """Answers per recipient from `replies` (default delivered); hold=True keeps attempts pending."""

    def __init__(self):
        self.replies = {}
        self.calls = []
        self.transfers = []
        self.dsn = False  # results say the hop took over DSN
        self.hold = False
        self.pending = []

    def deliver(self, route, hops, sender, recipients, data, transfer=None):
        self.calls.append((route.name, sender, tuple(recipients), data))
        self.transfers.append(transfer)
        results = []
        for rcpt in recipients:
            code, status = self.replies.get(rcpt, (250, "2.0.0"))
            outcome = "delivered" if code < 400 else "deferred" if code < 500 else "bounced"
            results.append(RecipientResult(rcpt, outcome, code, status, "reply %d" % code, hops[0],
                                           session="out%d" % len(self.calls), dsn=self.dsn))
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, results))
            return d
        return defer.succeed(results)

    def release_one(self):
        d, results = self.pending.pop(0)
        d.callback(results)


class FakeSigner:
    def __init__(self):
        self.calls = 0

    def sign(self, data):
        self.calls += 1
        return defer.succeed(b"DKIM-Signature: v=1; d=sender.example; b=fake\r\n")


@attr.s
class FakeConfig:
    delivery = attr.ib()
    gateway = attr.ib(default=GatewayConfig(hostname="mx.example.net"))


class SchedulerCase(unittest.TestCase):
    """A scheduler on a real spool with the fakes above (no tests of its own: see below)."""

    spool_class = Spool

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = self.spool_class(self.mktemp(), self.clock, run_in_thread=sync)
        self.successResultOf(self.spool.recover())
        self.router = FakeRouter()
        self.deliverer = FakeDeliverer()
        self.signer = FakeSigner()
        self.ids = iter("DSN%04d" % i for i in range(1000))
        self.service = self.make_service()

    def make_service(self, **delivery):
        from mailgate.events import EventBus

        values = dict(retry=(60.0, 300.0), max_lifetime=3600.0, delay_warning=0.0)
        values.update(delivery)
        self.events = []
        bus = EventBus(self.clock)
        bus.subscribe(lambda kind, fields: self.events.append(dict(fields)))
        service = DeliveryService(self.spool, self.router, self.deliverer,
                                  FakeConfig(DeliveryConfig(**values)), self.clock,
                                  lambda: next(self.ids), signer=self.signer, events=bus)
        return service

    def tracked(self, event):
        return [e for e in self.events if e["event"] == event]

    def start(self):
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def queue(self, qid="Q1", sender="a@sender.example", rcpts=("u@remote.example",)):
        envelope = Envelope(queue_id=qid, sender=sender, recipients=rcpts, client_ip="192.0.2.1",
                            received_at=self.clock.seconds())
        self.successResultOf(self.spool.enqueue(envelope, BODY))

    def entries(self, state=None):
        return {e.queue_id: s for s, e in self.successResultOf(self.spool.list(state))}

    def state(self, qid):
        raw = self.successResultOf(self.spool.load_state(qid))
        return MessageState.from_bytes(raw, None)


class SchedulerTests(SchedulerCase):
    def test_retry_delay_repeats_last(self):
        schedule = (60.0, 300.0, 900.0)
        self.assertEqual([retry_delay(schedule, n) for n in (1, 2, 3, 4, 9)],
                         [60.0, 300.0, 900.0, 900.0, 900.0])

    def test_accepted_message_is_delivered_at_once_and_removed(self):
        self.start()
        self.queue(rcpts=("u@remote.example", "v@remote.example", "w@example.com"))
        # Two destinations: the MX route for remote.example and the smarthost route.
        routes = sorted((c[0], c[2]) for c in self.deliverer.calls)
        self.assertEqual(routes, [("internal", ("w@example.com",)),
                                  ("internet", ("u@remote.example", "v@remote.example"))])
        self.assertEqual(self.entries(), {})

    def test_dkim_signature_prepended_on_mx_route_and_made_once(self):
        self.start()
        self.deliverer.replies["u@remote.example"] = (451, "4.3.0")
        self.queue()
        self.clock.advance(60)
        self.assertEqual(len(self.deliverer.calls), 2)
        for _, _, _, data in self.deliverer.calls:
            self.assertTrue(data.startswith(b"DKIM-Signature: v=1; d=sender.example; b=fake\r\n" + BODY[:5]))
        self.assertEqual(self.signer.calls, 1)

    def test_route_strip_headers_go_before_signing(self):
        self.start()
        route = attr.evolve(MX_ROUTE, strip_headers=("x-ms-exchange-organization-*",))
        self.router.route_for = lambda domain: route
        signed = []
        self.signer.sign = lambda data: signed.append(data) or defer.succeed(b"DKIM-Signature: x\r\n")
        envelope = Envelope(queue_id="Q1", sender="a@sender.example", recipients=("u@remote.example",),
                            client_ip="10.0.0.1", received_at=self.clock.seconds())
        internal = b"X-MS-Exchange-Organization-SCL: -1\r\n"
        self.successResultOf(self.spool.enqueue(envelope, internal + BODY))
        self.assertEqual(signed, [BODY])
        self.assertEqual(self.deliverer.calls[0][3], b"DKIM-Signature: x\r\n" + BODY)

    def test_smarthost_route_without_dkim_sign_is_not_signed(self):
        self.start()
        self.queue(rcpts=("w@example.com",))
        self.assertEqual(self.deliverer.calls[0][3], BODY)
        self.assertEqual(self.signer.calls, 0)

    def test_temporary_failure_is_retried_on_schedule_until_delivered(self):
        self.start()
        self.deliverer.replies["u@remote.example"] = (451, "4.3.0")
        self.queue()
        self.assertEqual(self.entries(), {"Q1": "deferred"})
        self.assertEqual(self.state("Q1").recipients["u@remote.example"]["outcome"], "deferred")
        self.clock.advance(59)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.deliverer.calls), 2)
        self.clock.advance(299)
        self.assertEqual(len(self.deliverer.calls), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.deliverer.calls), 3)
        self.clock.advance(300)  # the last interval repeats
        self.assertEqual(len(self.deliverer.calls), 4)
        del self.deliverer.replies["u@remote.example"]
        self.clock.advance(300)
        self.assertEqual(len(self.deliverer.calls), 5)
        self.assertEqual(self.entries(), {})

    def test_disk_full_while_saving_outcomes_retries_without_sending_twice(self):
        """The state file cannot be written: the round retries, delivered recipients are not
        sent again, and once space returns the message is done and removed."""
        from twisted.python.failure import Failure

        self.start()
        self.deliverer.replies["v@example.com"] = (451, "4.3.0")
        real = self.spool.save_state
        full = [True]

        def save_state(queue_id, data, claim=None):
            if full[0]:
                return defer.fail(Failure(OSError(28, "No space left on device")))
            return real(queue_id, data, claim=claim)

        self.spool.save_state = save_state
        self.queue(rcpts=("u@example.com", "v@example.com"))
        self.assertEqual(self.deliverer.calls[0][2], ("u@example.com", "v@example.com"))
        self.assertEqual(self.entries(), {"Q1": "active"})  # nothing acted on an unsaved outcome
        self.clock.advance(60)  # the retry of the failed round: still full
        self.assertEqual(len(self.deliverer.calls), 1)  # the save is retried first, not delivery
        full[0] = False
        del self.deliverer.replies["v@example.com"]
        self.clock.advance(60)
        self.assertEqual([c[2] for c in self.deliverer.calls],
                         [("u@example.com", "v@example.com"), ("v@example.com",)])
        self.clock.advance(300)
        self.assertEqual(self.entries(), {})
        self.flushLoggedErrors(OSError)

    def test_one_of_three_bounced_gets_one_dsn_and_the_rest_delivered(self):
        self.start()
        self.deliverer.replies["b@remote.example"] = (550, "5.1.1")
        self.queue(rcpts=("a@remote.example", "b@remote.example", "c@remote.example"))
        dsn_calls = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(len(dsn_calls), 1)
        route, sender, rcpts, data = dsn_calls[0]
        self.assertEqual(rcpts, ("a@sender.example",))
        dsn = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertIn("b@remote.example", data.decode())
        self.assertNotIn("Final-Recipient: rfc822; a@remote.example", data.decode())
        self.assertEqual(self.entries(), {})

    def test_no_dsn_for_null_sender(self):
        self.start()
        self.deliverer.replies["b@remote.example"] = (550, "5.1.1")
        self.queue(sender="", rcpts=("b@remote.example",))
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(self.entries(), {})

    def test_expiry_bounces_with_4_4_7(self):
        self.start()
        self.deliverer.replies["u@remote.example"] = (451, "4.3.0")
        self.queue()
        for _ in range(61):
            self.clock.advance(60)
        self.assertEqual(self.entries(), {})
        dsn = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(len(dsn), 1)
        text = dsn[0][3].decode()
        self.assertIn("Status: 4.4.7", text)
        self.assertIn("Action: failed", text)
        # Expiry happens at max_lifetime, not at the next retry slot after it.
        attempts = [c for c in self.deliverer.calls if c[1] != ""]
        self.assertEqual(len(attempts), 1 + 1 + 11)  # 0, 60, 360, 660, ... 3360; expired at 3600

    def test_delay_warning_sent_once(self):
        self.service = self.make_service(delay_warning=300.0)
        self.start()
        self.deliverer.replies["u@remote.example"] = (451, "4.3.0")
        self.queue()
        for _ in range(6):
            self.clock.advance(300)
        dsn = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(len(dsn), 1)
        self.assertIn("Action: delayed", dsn[0][3].decode())
        self.assertTrue(self.state("Q1").delay_warned)

    def test_no_route_bounces(self):
        self.start()
        self.queue(rcpts=("x@noroute.example",))
        dsn = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertIn("Status: 5.4.4", dsn[0][3].decode())

    def test_permanent_routing_error_bounces_temporary_defers(self):
        self.start()
        self.router.errors["nullmx.example"] = RoutingError("5.1.10", "null MX", permanent=True)
        self.router.errors["dnsdown.example"] = RoutingError("4.4.3", "DNS timeout", permanent=False)
        self.queue(rcpts=("x@nullmx.example", "y@dnsdown.example"))
        self.assertEqual(self.entries(), {"Q1": "deferred"})
        state = self.state("Q1")
        self.assertEqual(state.recipients["x@nullmx.example"]["status"], "5.1.10")
        self.assertEqual(state.recipients["x@nullmx.example"]["outcome"], "bounced")
        self.assertEqual(state.recipients["y@dnsdown.example"]["outcome"], "deferred")
        dsn = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(len(dsn), 1)
        self.assertIn("Status: 5.1.10", dsn[0][3].decode())

    def test_restart_delivers_only_what_was_not_recorded(self):
        # A crash after one recipient's outcome was saved: the new service sends only the other.
        self.queue(rcpts=("a@remote.example", "b@example.com"))
        msg = MessageState.new(Envelope("Q1", "a@sender.example", ("a@remote.example", "b@example.com"), ""))
        msg.record(RecipientResult("a@remote.example", "delivered", 250, "2.0.0", "ok"), 0)
        self.successResultOf(self.spool.save_state("Q1", msg.to_bytes()))
        self.start()
        self.assertEqual([c[2] for c in self.deliverer.calls], [("b@example.com",)])
        self.assertEqual(self.entries(), {})

    def test_per_destination_concurrency(self):
        self.service = self.make_service(per_destination_concurrency=2, concurrency=10)
        self.deliverer.hold = True
        self.start()
        for i in range(5):
            self.queue("Q%d" % i)
        self.assertEqual(len(self.deliverer.pending), 2)
        self.deliverer.release_one()
        self.assertEqual(len(self.deliverer.pending), 2)
        self.assertEqual(len(self.deliverer.calls), 3)

    def test_global_concurrency(self):
        self.service = self.make_service(per_destination_concurrency=5, concurrency=3)
        self.deliverer.hold = True
        self.start()
        for i in range(5):
            self.queue("Q%d" % i, rcpts=("u@d%d.example" % i,))
        self.assertEqual(len(self.deliverer.pending), 3)

    def test_held_and_quarantined_messages_are_not_delivered(self):
        self.start()
        envelope = Envelope(queue_id="H1", sender="a@sender.example", recipients=("u@remote.example",),
                            client_ip="192.0.2.1", received_at=self.clock.seconds())
        self.successResultOf(self.spool.enqueue(envelope, BODY, state="hold"))
        self.successResultOf(self.service.sweep())
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual(self.entries(), {"H1": "hold"})

    def test_deliver_defer_bounce_dsn_expire_events(self):
        self.start()
        self.deliverer.replies["b@remote.example"] = (550, "5.1.1")
        self.deliverer.replies["c@remote.example"] = (451, "4.3.0")
        self.queue(rcpts=("a@remote.example", "b@remote.example", "c@remote.example"))
        [deliver] = [e for e in self.tracked("DELIVER") if e["queue_id"] == "Q1"]
        self.assertEqual((deliver["recipients"], deliver["route"], deliver["remote_host"]),
                         (["a@remote.example"], "internet", "mx.remote.example"))
        self.assertEqual(deliver["reply"], "250 2.0.0 reply 250")
        self.assertEqual(deliver["session"], "out1")  # the outbound session, for trace
        [bounce] = self.tracked("BOUNCE")
        self.assertEqual(bounce["recipients"], ["b@remote.example"])
        [defer_] = self.tracked("DEFER")
        self.assertEqual(defer_["recipients"], ["c@remote.example"])
        [dsn] = self.tracked("DSN")
        self.assertEqual((dsn["queue_id"], dsn["action"], dsn["recipients"]),
                         ("Q1", "failed", ["b@remote.example"]))
        for _ in range(61):
            self.clock.advance(60)
        [expire] = self.tracked("EXPIRE")
        self.assertEqual(expire["recipients"], ["c@remote.example"])
        self.assertEqual(expire["latency"], 3600)


class StateWriteTests(SchedulerTests):
    """A message delivered to every recipient at once is simply removed: no state file write."""

    def count_saves(self):
        saves = []
        real = self.spool.save_state

        def counting(queue_id, data, claim=None):
            saves.append(queue_id)
            return real(queue_id, data, claim=claim)

        self.spool.save_state = counting
        return saves

    def test_delivered_at_once_writes_no_state(self):
        saves = self.count_saves()
        self.start()
        self.queue(rcpts=("u@remote.example", "v@remote.example"))
        self.assertEqual(self.entries(), {})
        self.assertEqual(saves, [])

    def test_two_destinations_save_the_first_outcome(self):
        """While one group is still in flight, the other's outcome is on disk first."""
        saves = self.count_saves()
        self.deliverer.hold = True
        self.start()
        self.queue(rcpts=("u@remote.example", "w@example.com"))
        self.deliverer.release_one()
        self.assertEqual(saves, ["Q1"])  # the first group: saved before the second finishes
        self.deliverer.release_one()
        self.assertEqual(saves, ["Q1"])  # the last one completes the message: removed
        self.assertEqual(self.entries(), {})

    def test_partial_failure_is_saved(self):
        saves = self.count_saves()
        self.deliverer.replies["v@remote.example"] = (451, "4.3.0")
        self.start()
        self.queue(rcpts=("u@remote.example", "v@remote.example"))
        self.assertGreaterEqual(len(saves), 1)
        self.assertEqual(self.state("Q1").recipients["u@remote.example"]["outcome"], "delivered")

    def test_bounce_is_recorded_before_the_message_goes(self):
        saves = self.count_saves()
        self.deliverer.replies["b@remote.example"] = (550, "5.1.1")
        self.start()
        self.queue(rcpts=("b@remote.example",))
        self.assertIn("Q1", saves)
        self.assertEqual(self.entries(), {})


class SlowStartTests(unittest.TestCase):
    def test_grows_by_one_per_limit_successes_up_to_the_maximum(self):
        from mailgate.delivery.scheduler import _DestinationSlots

        slots = _DestinationSlots(initial=5, maximum=7)
        self.assertEqual(slots.limit, 5)
        for _ in range(5):
            slots.succeeded()
        self.assertEqual(slots.limit, 6)
        for _ in range(100):
            slots.succeeded()
        self.assertEqual(slots.limit, 7)

    def test_failures_shrink_it_down_to_one(self):
        from mailgate.delivery.scheduler import _DestinationSlots

        slots = _DestinationSlots(initial=5, maximum=20)
        for _ in range(5):
            slots.failed()
        self.assertEqual(slots.limit, 4)
        for _ in range(100):
            slots.failed()
        self.assertEqual(slots.limit, 1)

    def test_initial_above_maximum_is_the_maximum(self):
        from mailgate.delivery.scheduler import _DestinationSlots

        self.assertEqual(_DestinationSlots(initial=5, maximum=2).limit, 2)

    def test_scheduler_starts_a_destination_at_initial_concurrency(self):
        clock = Clock()
        spool = Spool(self.mktemp(), clock, run_in_thread=sync)
        self.successResultOf(spool.recover())
        deliverer = FakeDeliverer()
        deliverer.hold = True
        service = DeliveryService(spool, FakeRouter(), deliverer, FakeConfig(DeliveryConfig(
            initial_destination_concurrency=2, per_destination_concurrency=20, delay_warning=0.0)),
            clock, lambda: "DSN")
        service.startService()
        self.addCleanup(service.stopService)
        for i in range(5):
            envelope = Envelope(queue_id="Q%d" % i, sender="a@sender.example",
                                recipients=("u@remote.example",), client_ip="192.0.2.1",
                                received_at=clock.seconds())
            self.successResultOf(spool.enqueue(envelope, BODY))
        self.assertEqual(len(deliverer.calls), 2)  # slow start: two at first
        deliverer.release_one()
        deliverer.release_one()  # two successes at limit 2: one more connection
        self.assertEqual(len(deliverer.calls), 5)


class FlakySpool(Spool):
    """A spool whose save_state and remove fail with QueueUnavailable the next `outage` times."""

    outage = 0
    saves = 0

    def save_state(self, queue_id, data, claim=None):
        self.saves += 1
        if self.outage:
            self.outage -= 1
            return defer.fail(QueueUnavailable("database unreachable: test"))
        return Spool.save_state(self, queue_id, data, claim=claim)

    def remove(self, queue_id, claim=None):  # removing records a delivery too
        if self.outage:
            self.outage -= 1
            return defer.fail(QueueUnavailable("database unreachable: test"))
        return Spool.remove(self, queue_id, claim=claim)


class ClaimTests(unittest.TestCase):
    """How the scheduler finds, claims, renews and records work (the IWorkSource seam)."""

    spool_class = FlakySpool
    setUp = SchedulerTests.setUp
    make_service = SchedulerTests.make_service
    start = SchedulerTests.start
    queue = SchedulerTests.queue
    entries = SchedulerTests.entries

    def test_an_outcome_is_recorded_once_the_queue_is_back(self):
        self.start()
        self.spool.outage = 3
        self.queue(rcpts=("w@example.com",))  # the smarthost route: no signature to save first
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(self.entries(), {"Q1": "active"})  # delivered, not yet recorded
        for wait in (1, 2):  # the waits between tries: 1s, then doubling
            self.clock.advance(wait)
            self.assertEqual(self.entries(), {"Q1": "active"})
        self.clock.advance(4)
        self.assertEqual(self.entries(), {})
        self.assertEqual(len(self.deliverer.calls), 1)  # never sent again

    def test_no_round_for_a_message_claimed_elsewhere(self):
        self.start()
        envelope = Envelope(queue_id="Q9", sender="a@sender.example", recipients=("u@remote.example",),
                            client_ip="192.0.2.1", received_at=self.clock.seconds())
        self.successResultOf(self.spool.enqueue(envelope, BODY, state="hold"))
        other = self.successResultOf(self.spool.claim("Q9"))
        self.successResultOf(self.spool.move("Q9", "active"))  # wakes the scheduler
        self.assertEqual(self.deliverer.calls, [])
        self.successResultOf(self.spool.release(other))
        self.clock.advance(SWEEP_INTERVAL)  # the sweep claims it now
        self.assertEqual(len(self.deliverer.calls), 1)

    def test_a_lost_claim_ends_the_round_quietly(self):
        self.deliverer.hold = True
        self.start()
        self.queue()
        self.successResultOf(self.spool.remove("Q1"))  # the administrator: the claim ends
        self.deliverer.release_one()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.entries(), {})

    def test_sweep_claims_what_is_due_and_wakes_at_the_next_retry(self):
        self.deliverer.replies["u@remote.example"] = (451, "4.3.0")
        self.queue()  # before the service runs: found by its first sweep
        self.start()
        self.assertEqual(len(self.deliverer.calls), 1)
        restarted = self.make_service()  # a restart: no timers, the sweep knows the next retry
        self.service.stopService()
        restarted.startService()
        self.addCleanup(restarted.stopService)
        self.clock.advance(59)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.deliverer.calls), 2)

    def test_claims_are_renewed_every_third_of_the_lease(self):
        renewed = []
        self.spool._claims.lease = 30.0
        self.spool.renew = lambda claims: renewed.append([c.queue_id for c in claims]) or defer.succeed([])
        self.service = self.make_service()
        self.deliverer.hold = True
        self.start()
        self.queue()
        self.clock.advance(10)
        self.assertEqual(renewed, [["Q1"]])
        self.deliverer.release_one()
        self.clock.advance(10)
        self.assertEqual(renewed, [["Q1"]])  # nothing held any more
