"""
The outbound side: decides what is due, groups recipients by next hop, and records every outcome.

Postfix's qmgr in one Twisted service.  A message is picked up as soon as the queue commits it
(queue.subscribe), or when its retry time comes (a timer on the injected clock), or by the slow
sweep that is only a backstop.  Each recipient's outcome is saved in the queue's state for the
message before anything acts on it, so after a crash only recipients that were in flight may be
sent again, and a delivered recipient never is.  Bounces (RFC 3464 DSNs) go back through the same
queue with the null sender.

The administrator's queue operations (flush, hold, release, delete, bounce) are methods here, so
that they agree with the rounds and timers: an operation on a message withdraws it first (its
timer is cancelled and a round in progress for it will neither move it back to deferred/ nor
schedule it again), then acts on the queue.  reconfigure() swaps in new routes and settings on a
reload; rounds in progress finish with what they started with.

Which process delivers what is the work source's (mailgate.interfaces.IWorkSource, the queue
itself by default): a round runs only under a claim on its message, renewed every third of the
lease while it runs and given to every save_state, move and remove, and released at its end.
Work is found by the queue's notices of its own commits (subscribe), by the other processes'
notices (on_due), by retry timers, and by claim_due sweeps every poll_interval (sooner when the
work source says when the next message falls due).  A claim that is lost (another node took
the message over) ends the round quietly; an outcome that cannot be recorded because the queue
is unreachable is tried again until it can, so that a delivery in flight during a database
outage is recorded once the database is back.
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailgate import headerfirewall
from mailgate.delivery import bounce
from mailgate.delivery.extensions import Transfer
from mailgate.envelope import Envelope, RecipientResult
from mailgate.errors import RoutingError
from mailgate.events import message_id
from mailgate.interfaces import IWorkSource
from mailgate.queue.claims import LeaseLost, LocalClaims, QueueUnavailable
from mailgate.queue.state import DeliveryState as MessageState  # noqa: F401 (its old home)

log = Logger()

SWEEP_INTERVAL = 300.0  # seconds between backstop scans of a queue that says nothing else
DELIVERABLE = ("active", "deferred")
RECORD_RETRY = (1.0, 30.0)  # first and longest wait between tries to record an outcome
ADMIN_BOUNCE = (550, "5.0.0", "Delivery cancelled by the administrator")


class QueueCommandError(Exception):
    """An operation the queue cannot do as asked (str: one line for the administrator)."""


class _Slots:
    """A semaphore whose limit can change while it is in use (a reload changes concurrency)."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.waiting = []

    def acquire(self):
        d = defer.Deferred()
        if self.used < self.limit and not self.waiting:
            self.used += 1
            d.callback(self)
        else:
            self.waiting.append(d)
        return d

    def release(self):
        self.used -= 1
        self._drain()

    def resize(self, limit):
        self.limit = limit  # lower than used: the extra holders finish, nobody new starts
        self._drain()

    def _drain(self):
        while self.waiting and self.used < self.limit:
            self.used += 1
            self.waiting.pop(0).callback(self)


class _DestinationSlots(_Slots):
    """
    The connections one destination may have, with Postfix's slow start and feedback: it starts
    at initial; each success adds 1/limit (one more connection per limit successes), each
    failure of the destination itself (refused, timed out, dropped) takes 1/limit away; never
    above maximum nor below 1.
    """

    def __init__(self, initial, maximum):
        _Slots.__init__(self, min(initial, maximum))
        self.maximum = maximum
        self._credit = 0.0

    def succeeded(self):
        if self.limit >= self.maximum:
            return
        self._credit += 1.0 / self.limit
        if self._credit >= 1.0:
            self._credit = 0.0
            self.resize(min(self.maximum, self.limit + 1))

    def failed(self):
        self._credit -= 1.0 / self.limit
        if self._credit <= -1.0:
            self._credit = 0.0
            self.resize(max(1, self.limit - 1))

    def reconfigure(self, maximum):
        self.maximum = maximum
        self.resize(min(self.limit, maximum))


_DESTINATION_TROUBLE = ("4.4.1", "4.4.2")  # refused or unreachable, timed out, dropped


def retry_delay(schedule, attempts):
    """Seconds to wait after the attempts-th failed round: the schedule, its last step repeating."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _domain(recipient):
    return recipient.rsplit("@", 1)[-1].lower()


class DeliveryService(service.Service):
    """
    Delivers what the queue holds.  router gives routes and hops, deliverer makes one SMTP
    attempt, signer (or None) makes DKIM signatures, new_queue_id names DSNs.
    """

    name = "delivery"

    def __init__(self, queue, router, deliverer, config, clock, new_queue_id, signer=None, events=None,
                 work=None):
        self.queue = queue
        if work is None:  # IWorkSource: which process delivers what
            work = queue if IWorkSource.providedBy(queue) else LocalClaims(queue)
        self.work = work
        self.router = router
        self.deliverer = deliverer
        self.delivery = config.delivery
        self.hostname = config.gateway.hostname
        self.clock = clock
        self.new_queue_id = new_queue_id
        self.signer = signer
        self.events = events  # a mailgate.events.EventBus, or None
        self._slots = _Slots(self.delivery.concurrency)
        self._destinations = {}
        self._timers = {}
        self._running = {}  # queue_id -> Deferred of the round in progress
        self._again = set()  # woken while a round was in progress: run once more after it
        self._forced = set()  # flushed: the next round runs even before its retry time
        # Outcomes the queue could not save (a full disk): the next round starts from them, not
        # from the older state on disk, so what was delivered is not sent again meanwhile.
        self._unsaved = {}  # queue_id -> MessageState
        self._withdrawn = {}  # queue_id -> token of the admin operation that owns it now
        self._claims = {}  # queue_id -> Claim of the round in progress
        self._sweeping = None  # the Deferred of the sweep in progress
        self._sweep_again = False
        self._sweep_call = None
        self._renewer = None
        self._unsubscribe = None
        self._unsubscribe_due = None

    def reconfigure(self, config, router, deliverer=None, signer=None):
        """
        A reload: new routes (router), [delivery] settings, hostname, DKIM signer and, when given,
        SMTP client.  Rounds in progress finish with what they started with; retry times already
        set stay as they are (the new schedule applies from the next failure on).
        """
        self.router = router
        if deliverer is not None and deliverer is not self.deliverer:
            self._close_idle()
            self.deliverer = deliverer
        self.signer = signer
        self.delivery = config.delivery
        self.hostname = config.gateway.hostname
        self._slots.resize(self.delivery.concurrency)
        for limit in self._destinations.values():
            limit.reconfigure(self.delivery.per_destination_concurrency)

    # -- lifecycle -------------------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self._unsubscribe = self.queue.subscribe(self._committed)
        self._unsubscribe_due = self.work.on_due(self._announced)
        lease = self.work.lease
        if lease:
            self._renewer = task.LoopingCall(self._renew)
            self._renewer.clock = self.clock
            self._renewer.start(lease / 3.0, now=False).addErrback(
                lambda f: log.failure("claim renewal stopped", f))
        self.sweep()

    def stopService(self):
        service.Service.stopService(self)
        for unsubscribe in (self._unsubscribe, self._unsubscribe_due):
            if unsubscribe is not None:
                unsubscribe()
        self._unsubscribe = self._unsubscribe_due = None
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._close_idle()

    def _close_idle(self):
        """QUIT on the connections the deliverer keeps open for the next message."""
        close = getattr(self.deliverer, "close", None)
        if close is not None:
            close()

    def _committed(self, queue_id, state):
        if state == "active" and self.running:
            self.wake(queue_id)

    def _announced(self):
        """Another process says work may be due (new mail, a release, a flush): look now."""
        if self.running:
            self.sweep()

    def sweep(self):
        """
        Claim what is due and nobody delivers (work.claim_due) and start its rounds; then sweep
        again after poll_interval, or when the next message falls due if that is sooner.  One
        sweep at a time: one asked for meanwhile runs right after.  Fires when this one is over.
        """
        if self._sweeping is not None:
            self._sweep_again = True
            return self._sweeping
        d = self._sweeping = defer.maybeDeferred(self._sweep)
        d.addErrback(self._sweep_failed)
        d.addBoth(self._swept)
        return d

    @defer.inlineCallbacks
    def _sweep(self):
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        room = 2 * self.delivery.concurrency - len(self._running)  # claims waiting for a slot
        if room <= 0:
            self._sweep_again = True  # a round that ends sweeps again
            return self.work.poll_interval
        now = self.clock.seconds()
        due = yield self.work.claim_due(now, room)
        for claim in due.claims:
            self.wake(claim.queue_id, claim)
        if len(due.claims) >= room:
            self._sweep_again = True
        delay = self.work.poll_interval
        if due.next_at is not None:
            delay = min(delay, max(0.0, due.next_at - self.clock.seconds()))
        return delay

    def _sweep_failed(self, failure):
        if failure.check(QueueUnavailable):
            log.warn("queue sweep: {error}; trying again later", error=failure.getErrorMessage())
        else:
            log.failure("queue sweep failed; trying again later", failure)
        return min(self.work.poll_interval, 30.0)

    def _swept(self, delay):
        self._sweeping = None
        if not self.running:
            return None
        if self._sweep_again and len(self._running) < 2 * self.delivery.concurrency:
            self._sweep_again = False
            self.sweep()
        elif delay is not None:
            self._sweep_call = self.clock.callLater(delay or 0.0, self.sweep)
        return None

    def _renew(self):
        """Keep the claims of the rounds in progress (every third of the lease)."""
        claims = list(self._claims.values())
        if not claims:
            return None
        d = self.work.renew(claims)

        def renewed(lost):
            for queue_id in lost:
                log.warn("{queue_id}: claim lost (not renewed in time); another node may deliver "
                         "it now", queue_id=queue_id)

        def failed(failure):
            log.warn("could not renew {count} claim(s): {error}", count=len(claims),
                     error=failure.getErrorMessage())

        return d.addCallbacks(renewed, failed)

    # -- one message -----------------------------------------------------------------------------

    def wake(self, queue_id, claim=None):
        """
        Run a delivery round for queue_id now (or right after the one in progress), under claim
        when the caller holds one, else under one claimed first.
        """
        self._cancel_timer(queue_id)
        if queue_id in self._running:
            self._again.add(queue_id)
            if claim is not None:
                self._release(claim)
            return self._running[queue_id]
        d = defer.maybeDeferred(self._round, queue_id, claim)
        d.addErrback(self._round_failed, queue_id)
        self._running[queue_id] = d
        d.addBoth(self._round_done, queue_id)
        return d

    def _round_done(self, result, queue_id):
        self._running.pop(queue_id, None)
        if queue_id in self._again and self.running:
            self._again.discard(queue_id)
            self.wake(queue_id)
        if self._sweep_again and self._sweeping is None and self.running:
            self.sweep()  # a slot is free for the claims a full sweep left
        return result

    def _round_failed(self, failure, queue_id):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure  # from one of the round's destination groups
        if failure.check(KeyError) or queue_id in self._withdrawn:
            return None  # removed (delivered, deleted) or set aside as corrupt meanwhile
        if failure.check(LeaseLost):
            log.warn("{queue_id}: {error}; stopped (another node or the administrator has it now)",
                     queue_id=queue_id, error=failure.value.why)
            return None
        if failure.check(QueueUnavailable):
            log.warn("delivery round for {queue_id}: {error}; retrying later", queue_id=queue_id,
                     error=failure.getErrorMessage())
        elif failure.check(OSError):  # the disk is full or failing: one line, not a traceback
            log.error("delivery round for {queue_id} failed ({error}); retrying later",
                      queue_id=queue_id, error=failure.getErrorMessage())
        else:
            log.failure("delivery round for {queue_id} failed; retrying later", failure,
                        queue_id=queue_id)
        self._schedule(queue_id, self.clock.seconds() + retry_delay(self.delivery.retry, 1))

    def _release(self, claim):
        d = self.work.release(claim)
        d.addErrback(lambda f: log.warn("could not release the claim on {queue_id}: {error} (it "
                                        "runs out by itself)", queue_id=claim.queue_id,
                                        error=f.getErrorMessage()))
        return d

    def _round(self, queue_id, claim=None):
        if claim is not None:
            return self._under(claim)
        return self.work.claim(queue_id).addCallback(self._claimed, queue_id)

    def _claimed(self, claim, queue_id):
        if claim is None:
            log.debug("{queue_id} is being delivered elsewhere", queue_id=queue_id)
            return None
        return self._under(claim)

    def _under(self, claim):
        """The round for claim.queue_id while holding claim, released when it is over."""
        queue_id = claim.queue_id
        self._claims[queue_id] = claim

        def over(result):
            if self._claims.get(queue_id) is claim:
                del self._claims[queue_id]
            return self._release(claim).addBoth(lambda _: result)

        return defer.maybeDeferred(self._claimed_round, queue_id).addBoth(over)

    def _save(self, queue_id, msg, claim):
        """
        save_state under claim; while the queue is unreachable, tried again (1s, doubling up to
        30s) until it can be done, so that an outcome already known is never forgotten.
        """
        data = msg.to_bytes()
        return self._record(queue_id, msg, lambda: self.queue.save_state(queue_id, data, claim=claim))

    def _remove(self, queue_id, msg, claim):
        """remove under claim, as _save records: what removing the message says is as dear."""
        return self._record(queue_id, msg, lambda: self.queue.remove(queue_id, claim=claim))

    @defer.inlineCallbacks
    def _record(self, queue_id, msg, write):
        wait = RECORD_RETRY[0]
        while True:
            try:
                yield write()
                return
            except QueueUnavailable as e:
                if not self.running:
                    self._unsaved[queue_id] = msg
                    raise
                log.warn("could not record the state of {queue_id} ({error}); trying again in "
                         "{wait:g}s", queue_id=queue_id, error=str(e), wait=wait)
                yield task.deferLater(self.clock, wait, lambda: None)
                wait = min(wait * 2, RECORD_RETRY[1])
            except LeaseLost:
                raise  # someone else has the message now: what we know is not ours to keep
            except Exception:
                # A full disk, an I/O error: msg is kept, and the next round saves it first.
                self._unsaved[queue_id] = msg
                raise

    @defer.inlineCallbacks
    def _claimed_round(self, queue_id):
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        state, envelope, data, raw = yield self.queue.load_with_state(queue_id)
        if state not in DELIVERABLE or queue_id in self._withdrawn:
            return
        msg = self._unsaved.pop(queue_id, None)
        if msg is None:
            msg = MessageState.from_bytes(raw, envelope)
        else:
            yield self._save(queue_id, msg, self._claims.get(queue_id))  # what the last round could not save, first
        now = self.clock.seconds()
        if msg.next_attempt > now and state == "deferred" and not forced:
            self._schedule(queue_id, msg.next_attempt)
            return
        if now - envelope.received_at >= self.delivery.max_lifetime:
            self._expire(envelope, data, msg, now)
        else:
            groups = self._groups(envelope, data, msg, now)
            left = [len(groups)]
            yield defer.gatherResults(
                [self._deliver_group(queue_id, envelope, data, msg, route, key, rcpts, left)
                 for route, key, rcpts in groups], consumeErrors=True)
        yield self._finish_round(queue_id, state, envelope, data, msg)

    def _track(self, event, envelope, data, **fields):
        if self.events is not None:
            self.events.track(event, queue_id=envelope.queue_id, message_id=message_id(data),
                              sender=envelope.sender, size=envelope.size, listener=envelope.listener,
                              client=envelope.client_ip, user=envelope.user, **fields)

    def _track_result(self, envelope, data, route, result):
        event = {"delivered": "DELIVER", "deferred": "DEFER", "bounced": "BOUNCE"}[result.outcome]
        extra = {"session": result.session} if result.session else {}
        self._track(event, envelope, data, recipients=[result.recipient], route=route,
                    reply="%s %s %s" % (result.code, result.status, result.text),
                    remote_host=result.remote.name if result.remote else None, tls=result.tls,
                    latency=self.clock.seconds() - envelope.received_at, **extra)

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
    def _deliver_group(self, queue_id, envelope, data, msg, route, key, rcpts, left):
        limit = self._destinations.get(key)
        if limit is None:
            limit = self._destinations[key] = _DestinationSlots(
                self.delivery.initial_destination_concurrency,
                self.delivery.per_destination_concurrency)
        yield limit.acquire()
        try:
            yield self._slots.acquire()
            try:
                if queue_id in self._withdrawn:
                    return  # held, deleted or bounced while it waited for a slot: no attempt
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
        if any(r.outcome == "delivered" for r in results):
            limit.succeeded()
        elif results and all(r.status in _DESTINATION_TROUBLE for r in results):
            limit.failed()
        left[0] -= 1
        if left[0] == 0 and self._done(queue_id, msg):
            return  # delivered to all: removing the message records it (no state to write first)
        # The outcome is on disk before anything acts on it (a bounce, a removal, a retry).
        yield self._save(queue_id, msg, self._claims.get(queue_id))

    def _done(self, queue_id, msg):
        """Every recipient delivered, nothing to report and no operation waiting on the state."""
        return (not msg.pending() and not msg.unreported("bounced")
                and queue_id not in self._withdrawn)

    @defer.inlineCallbacks
    def _attempt(self, queue_id, envelope, data, msg, route, rcpts):
        try:
            hops = yield self.router.hops(route, _domain(rcpts[0]))
        except RoutingError as e:
            outcome = "bounced" if e.permanent else "deferred"
            code = 550 if e.permanent else 451
            return [RecipientResult(r, outcome, code, e.status, e.text) for r in rcpts]
        data = self._strip(queue_id, data, route)
        signature = yield self._signature(queue_id, data, msg, route)
        results = yield self.deliverer.deliver(route, hops, envelope.sender, rcpts, signature + data,
                                               transfer=Transfer.of(envelope))
        return results

    def _strip(self, queue_id, data, route):
        """The route's strip_headers removed (Exchange's internal fields, for the internet)."""
        data, removed = headerfirewall.strip(data, route.strip_headers)
        if removed:
            log.info("{queue_id} route={route}: removed {count} header field(s): {names}",
                     queue_id=queue_id, route=route.name, count=sum(removed.values()),
                     names=", ".join("%s x%d" % item for item in sorted(removed.items())),
                     removed=removed)
        return data

    @defer.inlineCallbacks
    def _signature(self, queue_id, data, msg, route):
        """
        The DKIM-Signature for this route, made once and kept in the message's state: it is
        written with the outcome of the attempt (a retry signs with the same header), and a
        message delivered at once never needs it written at all.
        """
        if self.signer is None or not route.dkim_sign:
            return b""
        if route.name not in msg.dkim:
            header = yield self.signer.sign(data)
            msg.dkim[route.name] = header.decode("ascii") if header else ""
        return msg.dkim[route.name].encode("ascii")

    @defer.inlineCallbacks
    def _finish_round(self, queue_id, state, envelope, data, msg):
        if self._withdrawn_for(queue_id) in ("delete", "bounce"):
            return  # the operation owns the message now (a bounce reports what this round found)
        now = self.clock.seconds()
        claim = self._claims.get(queue_id)
        bounced = msg.unreported("bounced")
        if bounced:
            yield self._notify(envelope, data, msg, bounced, now, "failed")
        # NOTIFY=SUCCESS to a hop that does not do DSN: we say it was relayed (RFC 3461 5.2.2).
        relayed = [r for r in msg.unreported("delivered") if not msg.recipients[r].get("dsn")]
        if relayed:
            yield self._notify(envelope, data, msg, relayed, now, "relayed")
        pending = msg.pending()
        if not pending:
            if bounced:  # the DSN is queued: the state says so before the message goes
                yield self._save(queue_id, msg, claim)
            # Not removed (a full disk?): what this round did is kept for the next one, so that
            # it does not send again what it delivered (see _record).
            yield self._remove(queue_id, msg, claim)
            return
        msg.attempts += 1
        warn_at = envelope.received_at + self.delivery.delay_warning
        if self.delivery.delay_warning > 0 and not msg.delay_warned and now >= warn_at:
            yield self._notify(envelope, data, msg, pending, now, "delayed")
            msg.delay_warned = True
        expires = envelope.received_at + self.delivery.max_lifetime
        msg.next_attempt = min(now + retry_delay(self.delivery.retry, msg.attempts), expires)
        yield self._save(queue_id, msg, claim)
        # Checked right before each step: a hold made during this round must not be undone.
        if self._withdrawn_for(queue_id) is not None:
            return
        if state != "deferred":
            yield self.queue.move(queue_id, "deferred", claim=claim)
        if self._withdrawn_for(queue_id) is None:
            self._schedule(queue_id, msg.next_attempt)

    @defer.inlineCallbacks
    def _notify(self, envelope, data, msg, recipients, now, action):
        """
        Queue one DSN for recipients (never for a message from <>), then mark them reported.
        Only the recipients whose NOTIFY asks for this action get one (RFC 3461 4.1: FAILURE
        for "failed", DELAY for "delayed", SUCCESS for "relayed"; NEVER for none; without
        NOTIFY, FAILURE and DELAY).  Fires with the DSN's queue id, or None when none was made.
        """
        dsn_id = None
        wanted = bounce.NOTIFY_OF[action]
        asked = [r for r in recipients if wanted in envelope.notify(r)]
        if bounce.should_bounce(envelope) and asked:
            failures = [msg.as_result(r) for r in asked]
            dsn = bounce.make_dsn(self.hostname, envelope, data, failures, now, action=action)
            dsn_envelope = Envelope(
                queue_id=self.new_queue_id(), sender="", recipients=(envelope.sender,),
                client_ip="", helo=self.hostname, listener="", protocol="local",
                received_at=now, size=len(dsn), smtputf8=not envelope.sender.isascii())
            yield self.queue.enqueue(dsn_envelope, dsn)
            dsn_id = dsn_envelope.queue_id
            self._track("DSN", envelope, data, recipients=list(asked), action=action,
                        dsn_queue_id=dsn_envelope.queue_id)
            log.info("{queue_id} {action} notice queued as {dsn_id} for <{sender}>",
                     queue_id=envelope.queue_id, action=action, dsn_id=dsn_envelope.queue_id,
                     sender=envelope.sender)
        if action in ("failed", "relayed"):
            for r in recipients:
                msg.recipients[r]["reported"] = True
        return dsn_id

    def _schedule(self, queue_id, when):
        if not self.running:
            return
        self._cancel_timer(queue_id)
        delay = max(0.0, when - self.clock.seconds())
        self._timers[queue_id] = self.clock.callLater(delay, self._due, queue_id)

    def _due(self, queue_id):
        self._timers.pop(queue_id, None)
        self.wake(queue_id)

    # -- the administrator's queue operations --------------------------------------------------
    #
    # Each fires with a dict describing what was done, or fails with QueueCommandError (a request
    # that makes no sense for the message's state), KeyError (no such message) or ValueError (not
    # a queue id).

    def _withdrawn_for(self, queue_id):
        """The operation ("hold", "delete", "bounce") that owns queue_id now, or None."""
        mark = self._withdrawn.get(queue_id)
        return mark[0] if mark is not None else None

    def _cancel_timer(self, queue_id):
        call = self._timers.pop(queue_id, None)
        if call is not None and call.active():
            call.cancel()

    def _withdraw(self, queue_id, operation):
        """
        Take queue_id away from delivery for operation: no timer, no further round, and a round
        in progress will not move it back or schedule it.  Returns the mark for _settle.
        """
        mark = (operation, object())
        self._withdrawn[queue_id] = mark
        self._cancel_timer(queue_id)
        self._again.discard(queue_id)
        self._forced.discard(queue_id)
        return mark

    def _settle(self, queue_id, mark):
        """The operation is done: forget its mark, once no round that may have missed it runs."""
        running = self._running.get(queue_id)
        if running is None:
            if self._withdrawn.get(queue_id) is mark:
                del self._withdrawn[queue_id]
            return
        running.addBoth(self._settled, queue_id, mark)

    def _settled(self, result, queue_id, mark):
        self._settle(queue_id, mark)
        return result

    def _round_over(self, queue_id):
        """Fires (with None) once no delivery round for queue_id is in progress."""
        running = self._running.get(queue_id)
        if running is None:
            return defer.succeed(None)
        done = defer.Deferred()

        def over(result):
            self._round_over(queue_id).chainDeferred(done)
            return result

        running.addBoth(over)
        return done

    @defer.inlineCallbacks
    def flush(self, queue_id=None):
        """
        Retry now: one message (active or deferred), or every one of them.  Fires once the rounds
        are started, not finished: {"flushed": [queue ids]}.
        """
        if queue_id is not None:
            state, _, _ = yield self.queue.load(queue_id)
            if state not in DELIVERABLE:
                raise QueueCommandError("%s is in %s: release it first" % (queue_id, state))
            ids = [queue_id]
        else:
            ids = [e.queue_id for state, e in (yield self.queue.list()) if state in DELIVERABLE]
        woken = [qid for qid in ids if qid not in self._withdrawn]  # not those an operation owns
        yield self.work.make_due(woken, self.clock.seconds())  # and the other nodes hear of it
        for qid in woken:
            self._forced.add(qid)
            self.wake(qid)
        log.info("flush: retrying {count} message(s) now", count=len(woken))
        return {"flushed": woken}

    @defer.inlineCallbacks
    def hold(self, queue_id):
        """Move a message to hold (any state but quarantine): it is not delivered until released."""
        state, envelope, data = yield self.queue.load(queue_id)
        if state == "hold":
            return {"queue_id": queue_id, "state": "hold", "from": "hold"}
        if state == "quarantine":
            raise QueueCommandError("%s is in quarantine: release or delete it" % (queue_id,))
        mark = self._withdraw(queue_id, "hold")
        try:
            yield self.queue.move(queue_id, "hold")
        finally:
            self._settle(queue_id, mark)
        log.info("{queue_id} held by the administrator (was {state})", queue_id=queue_id, state=state)
        return {"queue_id": queue_id, "state": "hold", "from": state}

    @defer.inlineCallbacks
    def release(self, queue_id):
        """Hold or quarantine -> active: delivered at once.  Tracking RELEASE."""
        state, envelope, data = yield self.queue.load(queue_id)
        if state not in ("hold", "quarantine"):
            raise QueueCommandError("%s is not held or quarantined (it is %s)" % (queue_id, state))
        self._withdrawn.pop(queue_id, None)
        self._forced.add(queue_id)  # whatever its retry time was: the administrator wants it now
        yield self.queue.move(queue_id, "active")  # the queue's notice wakes delivery
        self._track("RELEASE", envelope, data, recipients=list(envelope.recipients),
                    stage=state, reason="administrator")
        log.info("{queue_id} released from {state} by the administrator", queue_id=queue_id,
                 state=state)
        return {"queue_id": queue_id, "state": "active", "from": state}

    @defer.inlineCallbacks
    def delete(self, queue_id):
        """Remove a message (any state) without telling anyone.  Tracking DELETE."""
        state, envelope, data = yield self.queue.load(queue_id)
        raw = yield self.queue.load_state(queue_id)
        msg = MessageState.from_bytes(raw, envelope)
        mark = self._withdraw(queue_id, "delete")
        try:
            yield self.queue.remove(queue_id)
        finally:
            self._settle(queue_id, mark)
        self._track("DELETE", envelope, data, recipients=msg.pending(), stage=state,
                    reason="administrator")
        log.info("{queue_id} deleted by the administrator (was {state})", queue_id=queue_id,
                 state=state)
        return {"queue_id": queue_id, "from": state, "pending": msg.pending()}

    @defer.inlineCallbacks
    def bounce(self, queue_id):
        """
        Give up on a message now (any state): every recipient still pending bounces with 5.0.0,
        the sender gets one DSN (unless it is <>), the message is removed.  A round in progress is
        let finish first, so that what it learns is reported too.  Tracking BOUNCE, then DSN.
        """
        yield self.queue.load(queue_id)  # KeyError, ValueError before anything changes
        mark = self._withdraw(queue_id, "bounce")
        claim = None
        try:
            yield self._round_over(queue_id)
            if self._withdrawn.get(queue_id) is not mark:
                raise QueueCommandError("%s: another operation took it over" % (queue_id,))
            self._cancel_timer(queue_id)
            claim = yield self.work.claim(queue_id)
            if claim is None:
                holders = yield self.work.holders([queue_id])
                who = holders.get(queue_id, ("another node",))[0]
                raise QueueCommandError("%s is being delivered by %s right now: try again once "
                                        "that attempt is over" % (queue_id, who))
            state, envelope, data = yield self.queue.load(queue_id)
            msg = self._unsaved.pop(queue_id, None)
            if msg is None:
                msg = MessageState.from_bytes((yield self.queue.load_state(queue_id)), envelope)
            now = self.clock.seconds()
            code, status, text = ADMIN_BOUNCE
            pending = msg.pending()
            for rcpt in pending:
                last = msg.recipients[rcpt].get("text")
                reason = "%s; last error: %s" % (text, last) if last else text
                result = RecipientResult(rcpt, "bounced", code, status, reason)
                msg.record(result, now)
                self._track("BOUNCE", envelope, data, recipients=[rcpt], route=None,
                            reply="%d %s %s" % (code, status, reason), reason="administrator",
                            latency=now - envelope.received_at)
            bounced = msg.unreported("bounced")
            dsn_id = None
            if bounced:
                dsn_id = yield self._notify(envelope, data, msg, bounced, now, "failed")
            yield self._save(queue_id, msg, claim)
            yield self.queue.remove(queue_id, claim=claim)
        finally:
            if claim is not None:
                self._release(claim)
            self._settle(queue_id, mark)
        log.info("{queue_id} bounced by the administrator: {count} recipient(s)", queue_id=queue_id,
                 count=len(pending))
        return {"queue_id": queue_id, "from": state, "bounced": pending, "dsn": dsn_id}


def _human(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds
