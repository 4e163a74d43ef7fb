"""
Which process delivers what: claims on queued messages (mailgate.interfaces.IWorkSource).

A scheduler delivers a message only while it holds a Claim on it.  A backend that one process
uses alone (the spool) keeps its claims in memory here (LocalClaims): they never expire, and
the only other party is the administrator.  A backend that several nodes share (PostgreSQL)
keeps them in the database as leases that run out unless renewed, so that a node that dies
loses its claims and the others take its work over.

Every operation that records delivery bookkeeping (save_state, move, remove) may be given the
claim it acts under; it then fails with LeaseLost, changing nothing, when the claim is no longer
held (another process took the message over, or an administrator's operation broke it), so a
node that was paused past its lease can never overwrite what the node that took over recorded.
"""

import itertools
import socket

import attr
from twisted.internet import defer

from mailgate.errors import QueueUnavailable  # noqa: F401 (re-exported: the queue's vocabulary)

DELIVERABLE = ("active", "deferred")


class LeaseLost(Exception):
    """The claim an operation was given is no longer held: nothing was changed."""

    def __init__(self, queue_id, why="the claim is no longer held"):
        Exception.__init__(self, queue_id, why)
        self.queue_id = queue_id
        self.why = why

    def __str__(self):
        return "%s: %s" % (self.queue_id, self.why)


@attr.s(frozen=True, slots=True)
class Claim:
    """The right to deliver one message, held by owner until `until` (None: until released)."""

    queue_id = attr.ib()
    owner = attr.ib()  # the node id (or process name) holding it: for people
    token = attr.ib()  # what tells this claim from every other one on the same message
    until = attr.ib(default=None)  # epoch seconds the lease runs out, as last known


@attr.s(frozen=True, slots=True)
class Due:
    """What claim_due found: claims on due messages, and when the next one not yet due will be."""

    claims = attr.ib(default=())
    next_at = attr.ib(default=None)  # epoch seconds, or None: nothing else waits


def local_node_id():
    """This machine's short name, lower-cased: the default node id."""
    return socket.gethostname().split(".")[0].lower() or "localhost"


class LocalClaims:
    """
    Claims for a queue one process uses alone: in memory, never expiring.  claim_due asks the
    queue itself (list and load_state) for what is due, so it reads every entry's state: it is
    what a sweep does, seldom.
    """

    lease = None  # claims never run out
    poll_interval = 300.0  # seconds between sweeps; new mail is heard of through subscribe()

    def __init__(self, queue, owner=None):
        self.queue = queue
        self.owner = owner or local_node_id()
        self._held = {}  # queue_id -> token
        self._tokens = itertools.count(1)

    def claim(self, queue_id):
        if queue_id in self._held:
            return defer.succeed(None)
        return defer.succeed(self._take(queue_id))

    def _take(self, queue_id):
        token = next(self._tokens)
        self._held[queue_id] = token
        return Claim(queue_id, self.owner, token)

    def holds(self, claim):
        return claim is not None and self._held.get(claim.queue_id) == claim.token

    def check(self, claim):
        """Raise LeaseLost unless claim (when given) is held."""
        if claim is not None and not self.holds(claim):
            raise LeaseLost(claim.queue_id)

    def forget(self, queue_id):
        """The message is gone: no claim on it is held any more."""
        self._held.pop(queue_id, None)

    @defer.inlineCallbacks
    def claim_due(self, now, limit):
        entries = yield self.queue.list()
        claims, next_at = [], None
        for state, envelope in entries:
            queue_id = envelope.queue_id
            if state not in DELIVERABLE or queue_id in self._held:
                continue
            when = 0.0
            if state == "deferred":
                try:
                    raw = yield self.queue.load_state(queue_id)
                    when = _next_attempt(raw)
                except (KeyError, ValueError):
                    continue
            if when > now:
                next_at = when if next_at is None else min(next_at, when)
            elif len(claims) < limit and queue_id not in self._held:
                claims.append(self._take(queue_id))
        return Due(tuple(claims), next_at)

    def renew(self, claims):
        return defer.succeed([c.queue_id for c in claims if not self.holds(c)])

    def release(self, claim):
        if self.holds(claim):
            del self._held[claim.queue_id]
        return defer.succeed(None)

    def make_due(self, queue_ids, now):
        return defer.succeed(None)  # one process: the scheduler that flushes delivers them itself

    def on_due(self, callback):
        return lambda: None  # nobody else adds work

    def holders(self, queue_ids):
        return defer.succeed({q: (self.owner, None) for q in queue_ids if q in self._held})


def _next_attempt(raw):
    import json

    if raw is None:
        return 0.0
    return float(json.loads(raw.decode("utf-8")).get("next_attempt") or 0.0)


class LocalWork:
    """
    IWorkSource for a queue class used by one process: mix it in and set self._claims to a
    LocalClaims(self) in __init__.
    """

    @property
    def lease(self):
        return self._claims.lease

    @property
    def poll_interval(self):
        return self._claims.poll_interval

    def claim(self, queue_id):
        return self._claims.claim(queue_id)

    def claim_due(self, now, limit):
        return self._claims.claim_due(now, limit)

    def renew(self, claims):
        return self._claims.renew(claims)

    def release(self, claim):
        return self._claims.release(claim)

    def make_due(self, queue_ids, now):
        return self._claims.make_due(queue_ids, now)

    def on_due(self, callback):
        return self._claims.on_due(callback)

    def holders(self, queue_ids):
        return self._claims.holders(queue_ids)
