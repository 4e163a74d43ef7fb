"""
The outbound side: decides what is due, groups recipients by next hop, and records every outcome.

Postfix's qmgr in one Twisted service.  A message is picked up as soon as the queue commits it
(queue.subscribe), or when its retry time comes (a timer on the injected clock), or by the slow
sweep that is only a backstop.  Each recipient's outcome is saved in the queue's state for the
message before anything acts on it, so after a crash only recipients that were in flight may be
sent again, and a delivered recipient never is.  Bounces (RFC 3464 DSNs) go back through the same
queue with the null sender.
"""

import json

import attr
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailgate import bounce
from mailgate.envelope import Envelope, RecipientResult
from mailgate.errors import RoutingError
from mailgate.events import message_id

log = Logger()

SWEEP_INTERVAL = 300.0  # seconds between backstop scans of the queue
DELIVERABLE = ("active", "deferred")


def retry_delay(schedule, attempts):
    """Seconds to wait after the attempts-th failed round: the schedule, its last step repeating."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _domain(recipient):
    return recipient.rsplit("@", 1)[-1].lower()


@attr.s
class MessageState:
    """What the queue's state file holds for one message (JSON)."""

    recipients = attr.ib()  # {address: {"outcome", "code", "status", "text", "remote", "at", "reported"}}
    attempts = attr.ib(default=0)  # completed delivery rounds
    next_attempt = attr.ib(default=0.0)
    delay_warned = attr.ib(default=False)
    dkim = attr.ib(factory=dict)  # route name -> DKIM-Signature header (str), made once

    @classmethod
    def new(cls, envelope):
        return cls(recipients={r: {"outcome": "pending"} for r in envelope.recipients})

    @classmethod
    def from_bytes(cls, data, envelope):
        if data is None:
            return cls.new(envelope)
        fields = json.loads(data.decode("utf-8"))
        return cls(**{a.name: fields[a.name] for a in attr.fields(cls) if a.name in fields})

    def to_bytes(self):
        return json.dumps(attr.asdict(self), sort_keys=True).encode("utf-8")

    def pending(self):
        return [r for r, s in self.recipients.items() if s["outcome"] in ("pending", "deferred")]

    def record(self, result, now):
        self.recipients[result.recipient] = {
            "outcome": result.outcome, "code": result.code, "status": result.status,
            "text": result.text, "remote": result.remote.name if result.remote else None,
            "at": now, "reported": False}

    def unreported(self, outcome):
        return [r for r, s in self.recipients.items() if s["outcome"] == outcome and not s.get("reported")]

    def as_result(self, recipient):
        s = self.recipients[recipient]
        remote = _Remote(s["remote"]) if s.get("remote") else None
        return RecipientResult(recipient, s["outcome"], s.get("code") or 0, s.get("status") or "",
                               s.get("text") or "", remote), s.get("at") or 0.0


@attr.s(frozen=True)
class _Remote:
    """Enough of a Hop for bounce.make_dsn (it only reports the name)."""

    name = attr.ib()
    address = attr.ib(default=None)
    port = attr.ib(default=None)


class DeliveryService(service.Service):
    """
    Delivers what the queue holds.  router gives routes and hops, deliverer makes one SMTP
    attempt, signer (or None) makes DKIM signatures, new_queue_id names DSNs.
    """

    name = "delivery"

    def __init__(self, queue, router, deliverer, config, clock, new_queue_id, signer=None, events=None):
        self.queue = queue
        self.router = router
        self.deliverer = deliverer
        self.delivery = config.delivery
        self.hostname = config.gateway.hostname
        self.clock = clock
        self.new_queue_id = new_queue_id
        self.signer = signer
        self.events = events  # a mailgate.events.EventBus, or None
        self._slots = defer.DeferredSemaphore(self.delivery.concurrency)
        self._destinations = {}
        self._timers = {}
        self._running = {}  # queue_id -> Deferred of the round in progress
        self._again = set()  # woken while a round was in progress: run once more after it
        self._sweeper = None

    # -- lifecycle -------------------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self.queue.subscribe(self._committed)
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=True).addErrback(
            lambda f: log.failure("queue sweep stopped", f))

    def stopService(self):
        service.Service.stopService(self)
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()

    def _committed(self, queue_id, state):
        if state == "active" and self.running:
            self.wake(queue_id)

    def sweep(self):
        """Backstop: make sure every deliverable message is either running or has a timer."""
        d = self.queue.list()

        def found(entries):
            for state, envelope in entries:
                qid = envelope.queue_id
                if state in DELIVERABLE and qid not in self._running and qid not in self._timers:
                    self.wake(qid)

        return d.addCallback(found)

    # -- one message -----------------------------------------------------------------------------

    def wake(self, queue_id):
        """Run a delivery round for queue_id now (or right after the one in progress)."""
        call = self._timers.pop(queue_id, None)
        if call is not None and call.active():
            call.cancel()
        if queue_id in self._running:
            self._again.add(queue_id)
            return self._running[queue_id]
        d = defer.maybeDeferred(self._round, queue_id)
        d.addErrback(self._round_failed, queue_id)
        self._running[queue_id] = d
        d.addBoth(self._round_done, queue_id)
        return d

    def _round_done(self, result, queue_id):
        self._running.pop(queue_id, None)
        if queue_id in self._again and self.running:
            self._again.discard(queue_id)
            self.wake(queue_id)
        return result

    def _round_failed(self, failure, queue_id):
        if failure.check(KeyError):
            return None  # removed (delivered, deleted) or set aside as corrupt meanwhile
        log.failure("delivery round for {queue_id} failed; retrying later", failure, queue_id=queue_id)
        self._schedule(queue_id, self.clock.seconds() + retry_delay(self.delivery.retry, 1))

    @defer.inlineCallbacks
    def _round(self, queue_id):
        state, envelope, data = yield self.queue.load(queue_id)
        if state not in DELIVERABLE:
            return
        msg = MessageState.from_bytes((yield self.queue.load_state(queue_id)), envelope)
        now = self.clock.seconds()
        if msg.next_attempt > now and state == "deferred":
            self._schedule(queue_id, msg.next_attempt)
            return
        if now - envelope.received_at >= self.delivery.max_lifetime:
            self._expire(envelope, data, msg, now)
        else:
            yield defer.gatherResults(
                [self._deliver_group(queue_id, envelope, data, msg, route, key, rcpts)
                 for route, key, rcpts in self._groups(envelope, data, msg, now)], consumeErrors=True)
        yield self._finish_round(queue_id, state, envelope, data, msg)

    def _track(self, event, envelope, data, **fields):
        if self.events is not None:
            self.events.track(event, queue_id=envelope.queue_id, message_id=message_id(data),
                              sender=envelope.sender, size=envelope.size, listener=envelope.listener,
                              client=envelope.client_ip, user=envelope.user, **fields)

    def _track_result(self, envelope, data, route, result):
        event = {"delivered": "DELIVER", "deferred": "DEFER", "bounced": "BOUNCE"}[result.outcome]
        self._track(event, envelope, data, recipients=[result.recipient], route=route,
                    reply="%s %s %s" % (result.code, result.status, result.text),
                    remote_host=result.remote.name if result.remote else None, tls=result.tls,
                    latency=self.clock.seconds() - envelope.received_at)

    def _groups(self, envelope, data, msg, now):
        """Pending recipients by destination; those without a route bounce here."""
        groups = {}
        for rcpt in msg.pending():
            route = self.router.route_for(_domain(rcpt))
            if route is None:
                result = RecipientResult(rcpt, "bounced", 554, "5.4.4", "No route to destination")
                msg.record(result, now)
                self._track_result(envelope, data, None, result)
                continue
            key = (route.name, _domain(rcpt)) if route.mx else (route.name,)
            groups.setdefault(key, (route, []))[1].append(rcpt)
        return [(route, key, rcpts) for key, (route, rcpts) in groups.items()]

    def _expire(self, envelope, data, msg, now):
        for rcpt in msg.pending():
            last = msg.recipients[rcpt]
            text = "Message expired after %s; last error: %s" % (
                _human(self.delivery.max_lifetime), last.get("text") or "none")
            msg.record(RecipientResult(rcpt, "bounced", last.get("code") or 451, "4.4.7", text), now)
            msg.recipients[rcpt]["remote"] = last.get("remote")
            self._track("EXPIRE", envelope, data, recipients=[rcpt], reply="4.4.7 " + text,
                        latency=now - envelope.received_at)
        log.info("{queue_id} expired after {lifetime}", queue_id=envelope.queue_id,
                 lifetime=_human(self.delivery.max_lifetime))

    @defer.inlineCallbacks
    def _deliver_group(self, queue_id, envelope, data, msg, route, key, rcpts):
        limit = self._destinations.setdefault(
            key, defer.DeferredSemaphore(self.delivery.per_destination_concurrency))
        yield limit.acquire()
        try:
            yield self._slots.acquire()
            try:
                results = yield self._attempt(queue_id, envelope, data, msg, route, rcpts)
            finally:
                self._slots.release()
        finally:
            limit.release()
        now = self.clock.seconds()
        for result in results:
            msg.record(result, now)
            self._track_result(envelope, data, route.name, result)
            log.info("{queue_id} to=<{rcpt}> route={route} {outcome}: {code} {status} {text}",
                     queue_id=queue_id, rcpt=result.recipient, route=route.name, outcome=result.outcome,
                     code=result.code, status=result.status, text=result.text,
                     remote=result.remote.name if result.remote else None, tls=result.tls)
        # The outcome is on disk before anything acts on it (a bounce, a removal, a retry).
        yield self.queue.save_state(queue_id, msg.to_bytes())

    @defer.inlineCallbacks
    def _attempt(self, queue_id, envelope, data, msg, route, rcpts):
        try:
            hops = yield self.router.hops(route, _domain(rcpts[0]))
        except RoutingError as e:
            outcome = "bounced" if e.permanent else "deferred"
            code = 550 if e.permanent else 451
            return [RecipientResult(r, outcome, code, e.status, e.text) for r in rcpts]
        signature = yield self._signature(queue_id, data, msg, route)
        results = yield self.deliverer.deliver(route, hops, envelope.sender, rcpts, signature + data)
        return results

    @defer.inlineCallbacks
    def _signature(self, queue_id, data, msg, route):
        """The DKIM-Signature for this route, made once and kept in the message's state."""
        if self.signer is None or not route.dkim_sign:
            return b""
        if route.name not in msg.dkim:
            header = yield self.signer.sign(data)
            msg.dkim[route.name] = header.decode("ascii") if header else ""
            yield self.queue.save_state(queue_id, msg.to_bytes())
        return msg.dkim[route.name].encode("ascii")

    @defer.inlineCallbacks
    def _finish_round(self, queue_id, state, envelope, data, msg):
        now = self.clock.seconds()
        bounced = msg.unreported("bounced")
        if bounced:
            yield self._notify(envelope, data, msg, bounced, now, "failed")
        pending = msg.pending()
        if not pending:
            yield self.queue.save_state(queue_id, msg.to_bytes())
            yield self.queue.remove(queue_id)
            log.info("{queue_id} done", queue_id=queue_id)
            return
        msg.attempts += 1
        warn_at = envelope.received_at + self.delivery.delay_warning
        if self.delivery.delay_warning > 0 and not msg.delay_warned and now >= warn_at:
            yield self._notify(envelope, data, msg, pending, now, "delayed")
            msg.delay_warned = True
        expires = envelope.received_at + self.delivery.max_lifetime
        msg.next_attempt = min(now + retry_delay(self.delivery.retry, msg.attempts), expires)
        yield self.queue.save_state(queue_id, msg.to_bytes())
        if state != "deferred":
            yield self.queue.move(queue_id, "deferred")
        self._schedule(queue_id, msg.next_attempt)

    @defer.inlineCallbacks
    def _notify(self, envelope, data, msg, recipients, now, action):
        """Queue one DSN for recipients (never for a message from <>), then mark them reported."""
        if bounce.should_bounce(envelope):
            failures = [msg.as_result(r) for r in recipients]
            dsn = bounce.make_dsn(self.hostname, envelope, data, failures, now, action=action)
            dsn_envelope = Envelope(
                queue_id=self.new_queue_id(), sender="", recipients=(envelope.sender,),
                client_ip="", helo=self.hostname, listener="", protocol="local",
                received_at=now, size=len(dsn))
            yield self.queue.enqueue(dsn_envelope, dsn)
            self._track("DSN", envelope, data, recipients=list(recipients), action=action,
                        dsn_queue_id=dsn_envelope.queue_id)
            log.info("{queue_id} {action} notice queued as {dsn_id} for <{sender}>",
                     queue_id=envelope.queue_id, action=action, dsn_id=dsn_envelope.queue_id,
                     sender=envelope.sender)
        if action == "failed":
            for r in recipients:
                msg.recipients[r]["reported"] = True

    def _schedule(self, queue_id, when):
        if not self.running:
            return
        old = self._timers.pop(queue_id, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timers[queue_id] = self.clock.callLater(delay, self._due, queue_id)

    def _due(self, queue_id):
        self._timers.pop(queue_id, None)
        self.wake(queue_id)


def _human(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds
