"""
What every queue backend must do, written once (QueueBehaviour) and run against each backend by
tests/queue/test_backends.py: the spool on a real thread pool and PostgreSQL on a throwaway
cluster (tests/pgcluster.py).  The tests run on the real reactor and return Deferreds.
"""

import json

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from zope.interface.verify import verifyObject

from mailgate.envelope import Envelope, RecipientResult
from mailgate.interfaces import IQueue, IWorkSource
from mailgate.queue import new_queue_id
from mailgate.queue.claims import Claim, Due, LeaseLost
from mailgate.queue.state import DeliveryState

BODY = b"Subject: hi\r\n\r\nbinary \x00\xff\xfe and a dot line\r\n.\r\n" * 3


def make_envelope(queue_id=None, recipients=("bob@example.com", "carol@example.com"), **kwargs):
    fields = dict(queue_id=queue_id or new_queue_id(), sender="alice@example.org",
                  recipients=tuple(recipients), client_ip="192.0.2.1", client_port=40000,
                  helo="client.example.org", received_at=1700000000.25, size=len(BODY))
    fields.update(kwargs)
    return Envelope(**fields)


def state_bytes(envelope, **changes):
    state = DeliveryState.new(envelope)
    for key, value in changes.items():
        setattr(state, key, value)
    return state.to_bytes()


def normalized(data):
    """A state's meaning: recipient keys whose value is None or a False "reported" are absent."""
    if data is None:
        return None
    state = json.loads(bytes(data).decode("utf-8"))
    state["recipients"] = {
        address: {k: v for k, v in status.items() if v is not None and not (k == "reported" and v is False)}
        for address, status in state["recipients"].items()}
    return state


def wait_for(d, timeout=15.0):
    """d, failing with TimeoutError if it has not fired within timeout (real seconds)."""
    return d.addTimeout(timeout, global_reactor)


class QueueBehaviour:
    """Mixed into a trial TestCase whose make_queue() returns a recovered, empty queue."""

    @defer.inlineCallbacks
    def setUp(self):
        self.queue = yield self.make_queue()

    @defer.inlineCallbacks
    def enqueue(self, envelope=None, data=BODY, state="active"):
        envelope = envelope or make_envelope()
        queue_id = yield self.queue.enqueue(envelope, data, state)
        self.assertEqual(queue_id, envelope.queue_id)
        return envelope

    def test_interfaces(self):
        verifyObject(IQueue, self.queue)
        verifyObject(IWorkSource, self.queue)

    @defer.inlineCallbacks
    def test_round_trip(self):
        envelope = yield self.enqueue()
        state, loaded, data = yield self.queue.load(envelope.queue_id)
        self.assertEqual((state, loaded, data), ("active", envelope, BODY))

    @defer.inlineCallbacks
    def test_empty_and_large_bodies(self):
        for body in (b"", bytes(range(256)) * 8192):
            envelope = yield self.enqueue(make_envelope(size=len(body)), body)
            self.assertEqual((yield self.queue.load(envelope.queue_id))[2], body)

    @defer.inlineCallbacks
    def test_list_sorted_by_id_and_by_state(self):
        ids = sorted(new_queue_id() for _ in range(4))
        for queue_id, state in zip(reversed(ids), ("active", "hold", "quarantine", "active")):
            yield self.enqueue(make_envelope(queue_id), state=state)
        entries = yield self.queue.list()
        self.assertEqual([e.queue_id for _, e in entries], ids)
        self.assertEqual(sorted(e.queue_id for _, e in (yield self.queue.list("active"))),
                         [ids[0], ids[3]])
        self.assertEqual([s for s, _ in (yield self.queue.list("hold"))], ["hold"])

    @defer.inlineCallbacks
    def test_bad_arguments(self):
        envelope = make_envelope()
        self.assertRaises(ValueError, self.queue.enqueue, envelope, BODY, "sent")
        self.assertRaises(ValueError, self.queue.load, "../etc/passwd")
        self.assertRaises(ValueError, self.queue.list, "nowhere")
        self.assertRaises(ValueError, self.queue.move, envelope.queue_id, "nowhere")
        yield defer.succeed(None)

    @defer.inlineCallbacks
    def test_move_and_remove(self):
        envelope = yield self.enqueue()
        heard = []
        self.queue.subscribe(lambda queue_id, state: heard.append((queue_id, state)))
        yield self.queue.move(envelope.queue_id, "hold")
        yield self.queue.move(envelope.queue_id, "hold")  # where it is: nothing to tell
        self.assertEqual((yield self.queue.load(envelope.queue_id))[0], "hold")
        self.assertEqual(heard, [(envelope.queue_id, "hold")])
        yield self.queue.remove(envelope.queue_id)
        yield self.assertFailure(self.queue.load(envelope.queue_id), KeyError)
        yield self.assertFailure(self.queue.remove(envelope.queue_id), KeyError)
        yield self.assertFailure(self.queue.move(envelope.queue_id, "active"), KeyError)

    @defer.inlineCallbacks
    def test_subscribers_hear_commits(self):
        heard = []
        unsubscribe = self.queue.subscribe(lambda queue_id, state: heard.append((queue_id, state)))
        envelope = yield self.enqueue()
        self.assertEqual(heard, [(envelope.queue_id, "active")])
        unsubscribe()
        yield self.enqueue()
        self.assertEqual(len(heard), 1)

    @defer.inlineCallbacks
    def test_delivery_state(self):
        envelope = yield self.enqueue()
        queue_id = envelope.queue_id
        self.assertIsNone((yield self.queue.load_state(queue_id)))
        first = DeliveryState.new(envelope)
        first.record(RecipientResult("bob@example.com", "deferred", 451, "4.3.0", "try later"), 5.0)
        first.attempts, first.next_attempt = 1, 1700000060.5
        yield self.queue.save_state(queue_id, first.to_bytes())
        self.assertEqual(normalized((yield self.queue.load_state(queue_id))), normalized(first.to_bytes()))
        second = DeliveryState.from_bytes((yield self.queue.load_state(queue_id)), envelope)
        second.record(RecipientResult("carol@example.com", "delivered", 250, "2.0.0", "ok"), 6.0)
        second.dkim = {"internet": "DKIM-Signature: v=1; d=x; b=y\r\n"}
        yield self.queue.save_state(queue_id, second.to_bytes())
        yield self.queue.move(queue_id, "deferred")  # the state follows the message
        loaded = DeliveryState.from_bytes((yield self.queue.load_state(queue_id)), envelope)
        self.assertEqual(loaded.recipients["carol@example.com"]["outcome"], "delivered")
        self.assertEqual(loaded.recipients["bob@example.com"]["code"], 451)
        self.assertEqual((loaded.attempts, loaded.next_attempt, loaded.dkim),
                         (1, 1700000060.5, second.dkim))
        yield self.queue.remove(queue_id)
        self.assertIsNone((yield self.queue.load_state(queue_id)))
        yield self.assertFailure(self.queue.save_state(queue_id, second.to_bytes()), KeyError)

    @defer.inlineCallbacks
    def test_load_with_state_is_load_and_load_state_in_one(self):
        envelope = yield self.enqueue()
        queue_id = envelope.queue_id
        state, loaded, data, raw = yield self.queue.load_with_state(queue_id)
        self.assertEqual((state, loaded.queue_id, raw), ("active", queue_id, None))
        self.assertEqual(data, (yield self.queue.load(queue_id))[2])
        saved = state_bytes(envelope)
        yield self.queue.save_state(queue_id, saved)
        yield self.queue.move(queue_id, "deferred")
        state, _, _, raw = yield self.queue.load_with_state(queue_id)
        self.assertEqual((state, normalized(raw)), ("deferred", normalized(saved)))
        yield self.queue.remove(queue_id)
        yield self.assertFailure(self.queue.load_with_state(queue_id), KeyError)

    @defer.inlineCallbacks
    def test_unknown_state_keys_are_kept(self):
        envelope = yield self.enqueue()
        state = json.loads(state_bytes(envelope).decode())
        state["future"] = {"a": 1}
        state["recipients"]["bob@example.com"]["orcpt"] = "rfc822;bob@example.com"
        data = json.dumps(state).encode()
        yield self.queue.save_state(envelope.queue_id, data)
        self.assertEqual(normalized((yield self.queue.load_state(envelope.queue_id))), normalized(data))

    @defer.inlineCallbacks
    def test_many_concurrent_enqueues(self):
        envelopes = [make_envelope() for _ in range(40)]
        ids = yield defer.gatherResults([self.queue.enqueue(e, BODY + e.queue_id.encode())
                                         for e in envelopes])
        self.assertEqual(ids, [e.queue_id for e in envelopes])
        for envelope in envelopes:
            self.assertEqual((yield self.queue.load(envelope.queue_id))[2],
                             BODY + envelope.queue_id.encode())

    @defer.inlineCallbacks
    def test_check_writable(self):
        self.assertIs((yield self.queue.check_writable()), True)

    # -- claims -------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_claim_is_exclusive_until_released(self):
        envelope = yield self.enqueue()
        claim = yield self.queue.claim(envelope.queue_id)
        self.assertIsInstance(claim, Claim)
        self.assertEqual(claim.queue_id, envelope.queue_id)
        self.assertIsNone((yield self.queue.claim(envelope.queue_id)))
        holders = yield self.queue.holders([envelope.queue_id])
        self.assertEqual(list(holders), [envelope.queue_id])
        self.assertEqual(holders[envelope.queue_id][0], claim.owner)
        yield self.queue.release(claim)
        self.assertEqual((yield self.queue.holders([envelope.queue_id])), {})
        again = yield self.queue.claim(envelope.queue_id)
        self.assertNotEqual(again.token, claim.token)

    @defer.inlineCallbacks
    def test_operations_under_a_stale_claim_change_nothing(self):
        envelope = yield self.enqueue()
        queue_id = envelope.queue_id
        stale = yield self.queue.claim(queue_id)
        yield self.queue.release(stale)
        current = yield self.queue.claim(queue_id)
        yield self.queue.save_state(queue_id, state_bytes(envelope, attempts=1), claim=current)
        yield self.assertFailure(
            self.queue.save_state(queue_id, state_bytes(envelope, attempts=7), claim=stale), LeaseLost)
        yield self.assertFailure(self.queue.move(queue_id, "deferred", claim=stale), LeaseLost)
        yield self.assertFailure(self.queue.remove(queue_id, claim=stale), LeaseLost)
        self.assertEqual(json.loads((yield self.queue.load_state(queue_id)))["attempts"], 1)
        self.assertEqual((yield self.queue.load(queue_id))[0], "active")
        self.assertEqual((yield self.queue.renew([stale, current])), [queue_id])
        yield self.queue.move(queue_id, "deferred", claim=current)
        yield self.queue.remove(queue_id, claim=current)
        yield self.assertFailure(self.queue.load(queue_id), KeyError)

    @defer.inlineCallbacks
    def test_claimed_move_never_undoes_a_hold(self):
        envelope = yield self.enqueue()
        claim = yield self.queue.claim(envelope.queue_id)
        yield self.queue.move(envelope.queue_id, "hold")  # the administrator, meanwhile
        yield self.queue.save_state(envelope.queue_id, state_bytes(envelope, attempts=1), claim=claim)
        failure = yield self.assertFailure(
            self.queue.move(envelope.queue_id, "deferred", claim=claim), LeaseLost)
        self.assertIn("hold", str(failure))
        self.assertEqual((yield self.queue.load(envelope.queue_id))[0], "hold")

    @defer.inlineCallbacks
    def test_claim_due(self):
        now = 1700001000.0
        active = yield self.enqueue()
        held = yield self.enqueue(state="hold")
        due = yield self.enqueue()
        later = yield self.enqueue()
        for envelope, when in ((due, now - 1), (later, now + 60)):
            yield self.queue.move(envelope.queue_id, "deferred")
            yield self.queue.save_state(envelope.queue_id, state_bytes(envelope, next_attempt=when))
        first = yield self.queue.claim_due(now, 1)
        self.assertIsInstance(first, Due)
        self.assertEqual(len(first.claims), 1)
        rest = yield self.queue.claim_due(now, 10)
        claimed = sorted(c.queue_id for c in first.claims + rest.claims)
        self.assertEqual(claimed, sorted([active.queue_id, due.queue_id]))
        self.assertEqual(rest.next_at, now + 60)
        self.assertEqual((yield self.queue.claim_due(now, 10)).claims, ())  # all held now
        self.assertNotIn(held.queue_id, claimed)
        for claim in first.claims + rest.claims:
            yield self.queue.release(claim)
        again = yield self.queue.claim_due(now + 61, 10)
        self.assertEqual(len(again.claims), 3)
        self.assertIsNone(again.next_at)

    @defer.inlineCallbacks
    def test_removal_ends_claims(self):
        envelope = yield self.enqueue()
        claim = yield self.queue.claim(envelope.queue_id)
        yield self.queue.remove(envelope.queue_id)  # the administrator's delete
        self.assertEqual((yield self.queue.renew([claim])), [envelope.queue_id])
        # Gone and no longer held, both true: either answer stops the scheduler quietly.
        yield self.assertFailure(
            self.queue.save_state(envelope.queue_id, state_bytes(envelope), claim=claim),
            KeyError, LeaseLost)
