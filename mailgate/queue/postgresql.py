"""
The queue in PostgreSQL ([queue] backend = postgresql): one queue that any number of gateway
nodes share, so that the mail a node accepted is delivered by the others when it dies.

It is an IQueue (what listeners, filters, bounces, queue commands, metrics and /healthz use, the
same as the spool) and an IWorkSource (which node delivers what):

- Accept: envelope, body (bytea, written once) and a row per recipient are INSERTed in one
  transaction that has committed before enqueue() fires, so before the client hears 250.
  Concurrent sessions' messages are committed together (one transaction, one WAL flush) when
  they arrive while the pool is busy; a batch that fails for another reason than the database
  being unreachable is retried message by message, so one bad message fails alone.
- Delivery: claim() and claim_due() take messages with a lease in one atomic UPDATE (the due ones
  through `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent nodes never wait for each other);
  renew() extends the leases the scheduler holds; save_state(), move() and remove() lock the
  message's row and check the claim's token in the same transaction as the change (LeaseLost
  when another node took it over).  A node that stops renewing loses its messages to the first
  node that claims them after the lease ran out.  The delivery state is split into columns of
  the message (attempts, next_attempt, ...) and a row per recipient; keys the schema does not
  know are kept in jsonb so that a newer state format survives.
- Notices: new mail, a release and a flush are announced with NOTIFY (in the committing
  transaction); every other node LISTENs on a connection of its own and sweeps at once.
  Polling (claim_due every poll_interval) is only the fallback.
- Trouble: every operation that cannot reach the database fails with QueueUnavailable (451 at
  end of data, 503 on /healthz via check_writable); the pool reconnects by itself, following a
  multi-host DSN with target_session_attrs=read-write to a promoted standby.

All database work runs in the pool's threads (mailgate.queue.pgpool); the functions prefixed
_job_ are the thread-side halves.
"""

import json
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.envelope import Envelope
from mailgate.interfaces import IQueue, IWorkSource
from mailgate.queue import migrations
from mailgate.queue.claims import DELIVERABLE, Claim, Due, LeaseLost, QueueUnavailable, local_node_id
from mailgate.queue.ids import check_queue_id as _check_id
from mailgate.queue.ids import check_state as _check_state
from mailgate.queue.pgpool import Connector, Database, Listener, SchemaMismatch
from mailgate.queue.state import RECIPIENT_FIELDS

log = Logger()

MAX_BATCH = 200  # messages in one accept transaction
MAX_BATCH_BYTES = 32 * 1024 * 1024
_MESSAGE_FIELDS = ("attempts", "next_attempt", "delay_warned", "dkim")


def _jsonb(value):
    from psycopg.types.json import Jsonb

    return Jsonb(value)


# --- thread side -------------------------------------------------------------------------------------


def check_schema(connection, config_path=None):
    """Refuse a connection to a database whose schema is not this mailgate's (SchemaMismatch)."""
    problem = migrations.mismatch(migrations.current_version(connection), config_path)
    if problem:
        raise SchemaMismatch(problem)


def _job_enqueue(c, items, notice):
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO mailgate_messages (queue_id, state, envelope, size, received_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            [(i["queue_id"], i["state"], i["envelope"], i["size"], i["received_at"]) for i in items])
        cur.executemany("INSERT INTO mailgate_bodies (queue_id, data) VALUES (%s, %b)",
                        [(i["queue_id"], i["data"]) for i in items])
        cur.executemany(
            "INSERT INTO mailgate_recipients (queue_id, address, position) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(i["queue_id"], address, n) for i in items for n, address in enumerate(i["recipients"])])
        if any(i["state"] == "active" for i in items):
            cur.execute("SELECT pg_notify(%s, %s)", (migrations.CHANNEL, notice))


def _job_load(c, queue_id):
    row = c.execute(
        "SELECT m.state, m.envelope, b.data FROM mailgate_messages m "
        "JOIN mailgate_bodies b USING (queue_id) WHERE m.queue_id = %s", (queue_id,)).fetchone()
    if row is None:
        raise KeyError(queue_id)
    return row[0], row[1], bytes(row[2])


def _job_load_with_state(c, queue_id):
    state, envelope, data = _job_load(c, queue_id)
    return state, envelope, data, _job_load_state(c, queue_id)


def _job_list(c, state):
    if state is None:
        cur = c.execute("SELECT state, envelope FROM mailgate_messages ORDER BY queue_id")
    else:
        cur = c.execute("SELECT state, envelope FROM mailgate_messages WHERE state = %s "
                        "ORDER BY queue_id", (state,))
    return cur.fetchall()


def _lock(c, queue_id):
    """(state, lease_token) of queue_id, its row locked until the transaction ends; KeyError."""
    row = c.execute("SELECT state, lease_token FROM mailgate_messages WHERE queue_id = %s "
                    "FOR UPDATE", (queue_id,)).fetchone()
    if row is None:
        raise KeyError(queue_id)
    return row


def _check_claim(queue_id, token, held):
    if token is not None and held != token:
        raise LeaseLost(queue_id, "its claim was taken over")


def _job_move(c, queue_id, state, token, notice):
    current, held = _lock(c, queue_id)
    _check_claim(queue_id, token, held)
    if current == state:
        return False
    if token is not None and current not in DELIVERABLE:
        raise LeaseLost(queue_id, "it is in %s now" % (current,))
    c.execute("UPDATE mailgate_messages SET state = %s WHERE queue_id = %s", (state, queue_id))
    if state == "active":
        c.execute("SELECT pg_notify(%s, %s)", (migrations.CHANNEL, notice))
    return True


def _job_remove(c, queue_id, token):
    _, held = _lock(c, queue_id)
    _check_claim(queue_id, token, held)
    c.execute("DELETE FROM mailgate_messages WHERE queue_id = %s", (queue_id,))


def _split_state(data):
    """The delivery state's JSON as (message columns, extra, [(address, columns, extra)])."""
    fields = json.loads(bytes(data).decode("utf-8"))
    if not isinstance(fields, dict) or not isinstance(fields.get("recipients", {}), dict):
        raise ValueError("not a delivery state")
    recipients = fields.pop("recipients", {})
    message = {key: fields.pop(key) for key in _MESSAGE_FIELDS if key in fields}
    rows = []
    for address, status in recipients.items():
        status = dict(status)
        columns = {key: status.pop(key, None) for key in RECIPIENT_FIELDS}
        rows.append((address, columns, status))
    return message, fields, rows


def _job_save_state(c, queue_id, data, token):
    message, extra, rows = _split_state(data)
    _, held = _lock(c, queue_id)
    _check_claim(queue_id, token, held)
    c.execute(
        "UPDATE mailgate_messages SET has_state = true, attempts = %s, next_attempt = %s, "
        "delay_warned = %s, dkim = %s, extra = %s WHERE queue_id = %s",
        (int(message.get("attempts") or 0), float(message.get("next_attempt") or 0.0),
         bool(message.get("delay_warned")), _jsonb(message.get("dkim") or {}), _jsonb(extra),
         queue_id))
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO mailgate_recipients AS r (queue_id, address, position, outcome, code, "
            "status, text, remote, at, reported, extra) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (queue_id, address) DO UPDATE SET outcome = EXCLUDED.outcome, "
            "code = EXCLUDED.code, status = EXCLUDED.status, text = EXCLUDED.text, "
            "remote = EXCLUDED.remote, at = EXCLUDED.at, reported = EXCLUDED.reported, "
            "extra = EXCLUDED.extra "
            "WHERE (r.outcome, r.code, r.status, r.text, r.remote, r.at, r.reported, r.extra) "
            "IS DISTINCT FROM (EXCLUDED.outcome, EXCLUDED.code, EXCLUDED.status, EXCLUDED.text, "
            "EXCLUDED.remote, EXCLUDED.at, EXCLUDED.reported, EXCLUDED.extra)",
            [(queue_id, address, n, columns["outcome"] or "pending", columns["code"],
              columns["status"], columns["text"], columns["remote"], columns["at"],
              bool(columns["reported"]), _jsonb(rest))
             for n, (address, columns, rest) in enumerate(rows)])


def _job_load_state(c, queue_id):
    row = c.execute("SELECT has_state, attempts, next_attempt, delay_warned, dkim, extra "
                    "FROM mailgate_messages WHERE queue_id = %s", (queue_id,)).fetchone()
    if row is None or not row[0]:
        return None
    _, attempts, next_attempt, delay_warned, dkim, extra = row
    state = dict(extra or {})
    state.update(attempts=attempts, next_attempt=next_attempt, delay_warned=delay_warned,
                 dkim=dkim or {})
    recipients = {}
    for values in c.execute("SELECT address, outcome, code, status, text, remote, at, reported, "
                            "extra FROM mailgate_recipients WHERE queue_id = %s ORDER BY position",
                            (queue_id,)):
        status = dict(values[8] or {})
        for key, value in zip(RECIPIENT_FIELDS, values[1:8]):
            if value is not None and not (key == "reported" and value is False):
                status[key] = value
        recipients[values[0]] = status
    state["recipients"] = recipients
    return json.dumps(state, sort_keys=True).encode("utf-8")


_LEASE = "lease_owner = %(owner)s, lease_token = nextval('mailgate_lease_token'), " \
         "lease_until = now() + make_interval(secs => %(lease)s)"
_RETURNING = "RETURNING m.queue_id, m.lease_token, extract(epoch FROM m.lease_until)::float8"
_FREE = "(m.lease_token IS NULL OR m.lease_until < now())"


def _job_claim(c, queue_id, owner, lease):
    return c.execute(
        "UPDATE mailgate_messages m SET " + _LEASE + " WHERE m.queue_id = %(id)s AND " + _FREE
        + " " + _RETURNING, {"owner": owner, "lease": lease, "id": queue_id}).fetchone()


def _job_claim_due(c, owner, lease, now, limit):
    claimed = c.execute(
        "WITH due AS (SELECT queue_id FROM mailgate_messages m WHERE m.state IN "
        "('active', 'deferred') AND (m.state = 'active' OR m.next_attempt <= %(now)s) AND "
        + _FREE + " ORDER BY m.next_attempt, m.queue_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
        "UPDATE mailgate_messages m SET " + _LEASE + " FROM due WHERE m.queue_id = due.queue_id "
        + _RETURNING, {"owner": owner, "lease": lease, "now": now, "limit": limit}).fetchall()
    next_at = c.execute(
        "SELECT min(next_attempt) FROM mailgate_messages m WHERE m.state = 'deferred' AND "
        "m.next_attempt > %(now)s AND " + _FREE, {"now": now}).fetchone()[0]
    return claimed, next_at


def _job_renew(c, owner, lease, queue_ids, tokens):
    rows = c.execute(
        "UPDATE mailgate_messages m SET lease_until = now() + make_interval(secs => %s) "
        "FROM unnest(%s::text[], %s::bigint[]) AS held(queue_id, token) "
        "WHERE m.queue_id = held.queue_id AND m.lease_token = held.token AND m.lease_owner = %s "
        "RETURNING m.queue_id, m.lease_token", (lease, queue_ids, tokens, owner)).fetchall()
    return [tuple(row) for row in rows]


def _job_release(c, queue_id, token):
    c.execute("UPDATE mailgate_messages SET lease_owner = NULL, lease_token = NULL, "
              "lease_until = NULL WHERE queue_id = %s AND lease_token = %s", (queue_id, token))


def _job_make_due(c, queue_ids, now, notice):
    c.execute("UPDATE mailgate_messages SET next_attempt = least(next_attempt, %s) "
              "WHERE queue_id = ANY(%s) AND state IN ('active', 'deferred')", (now, queue_ids))
    c.execute("SELECT pg_notify(%s, %s)", (migrations.CHANNEL, notice))


def _job_holders(c, queue_ids):
    return c.execute(
        "SELECT queue_id, lease_owner, extract(epoch FROM lease_until)::float8 "
        "FROM mailgate_messages WHERE queue_id = ANY(%s) AND lease_token IS NOT NULL "
        "AND lease_until > now()", (queue_ids,)).fetchall()


def _job_recover(c, owner):
    """Give up the leases an earlier run of this node left (it is not running them any more)."""
    released = c.execute("UPDATE mailgate_messages SET lease_owner = NULL, lease_token = NULL, "
                         "lease_until = NULL WHERE lease_owner = %s RETURNING queue_id",
                         (owner,)).fetchall()
    count = c.execute("SELECT count(*) FROM mailgate_messages").fetchone()[0]
    return len(released), count


def _job_probe(c):
    return c.execute("SELECT pg_is_in_recovery()").fetchone()[0]


# --- reactor side ------------------------------------------------------------------------------------


@implementer(IQueue, IWorkSource)
class PostgresQueue:
    """
    The shared queue for config (a QueueConfig with backend = postgresql).  recover() opens the
    connections (and fires once the database was looked at); close() closes them.
    """

    def __init__(self, config, reactor, config_path=None):
        self.reactor = reactor
        self.node_id = config.node_id or local_node_id()
        self.lease = float(config.lease)
        self.poll_interval = max(1.0, min(30.0, self.lease / 4.0))
        self.dsn = config.dsn
        self._token = secrets.token_hex(6)  # tells our own notices from the other processes'
        connector = Connector(config.dsn, config.password_file, "mailgate " + self.node_id,
                              check=lambda connection: check_schema(connection, config_path))
        self.db = Database(reactor, connector, config.pool_size)
        self.listener = Listener(reactor, Connector(config.dsn, config.password_file,
                                                    "mailgate %s listen" % self.node_id),
                                 migrations.CHANNEL, self._heard)
        self._subscribers = []
        self._due_callbacks = []
        self._pending = []  # (item, Deferred) waiting for an accept transaction
        self._batches = 0  # accept transactions in progress
        self.commit_jobs = 0  # accept transactions run: for tests and the benchmark
        self._opened = False

    # -- life ---------------------------------------------------------------------------------------

    def open(self):
        if not self._opened:
            self._opened = True
            self.db.start()
            self.listener.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)

    def close(self):
        """Stop listening, wait for the jobs in progress, close every connection."""
        if self._opened:
            self._opened = False
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass  # we are that trigger
            self.listener.stop()
            self.db.stop()

    def recover(self):
        self.open()
        d = self.db.run(_job_recover, self.node_id)
        d.addCallbacks(self._recovered, self._not_recovered)
        return d

    def _recovered(self, result):
        released, count = result
        log.info("Queue in PostgreSQL ready for node {node}: {count} messages, {released} leases "
                 "left by an earlier run given up", node=self.node_id, count=count, released=released)
        return released

    def _not_recovered(self, failure):
        if failure.check(SchemaMismatch):
            log.critical("queue: {error}", error=failure.getErrorMessage())
            return failure
        failure.trap(QueueUnavailable)
        log.error("queue: {error}; mail is refused with 451 until the database is back",
                  error=failure.getErrorMessage())
        return 0

    # -- accept -------------------------------------------------------------------------------------

    def enqueue(self, envelope, data, state="active"):
        _check_state(state)
        queue_id = _check_id(envelope.queue_id)
        item = {"queue_id": queue_id, "state": state, "envelope": envelope.to_json().decode("utf-8"),
                "size": envelope.size, "received_at": envelope.received_at, "data": bytes(data),
                "recipients": list(dict.fromkeys(envelope.recipients))}
        d = defer.Deferred()
        self._pending.append((item, d))
        self._start_batches()
        return d

    def _start_batches(self):
        while self._pending and self._batches < self.db.size:
            batch, size = [], 0
            while self._pending and len(batch) < MAX_BATCH and (not batch or size < MAX_BATCH_BYTES):
                item, d = self._pending.pop(0)
                batch.append((item, d))
                size += len(item["data"])
            self._run_batch(batch)

    def _run_batch(self, batch):
        self._batches += 1
        self.commit_jobs += 1
        d = self.db.run(_job_enqueue, [item for item, _ in batch], self._notice("new"))
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, result, batch):
        self._batches -= 1
        if isinstance(result, Failure) and len(batch) > 1 and not result.check(QueueUnavailable):
            for one in batch:  # one bad message must not fail the others: each on its own
                self._run_batch([one])
            return None
        self._start_batches()
        for item, d in batch:
            if isinstance(result, Failure):
                log.error("Could not queue {queue_id} in {state}: {error}", queue_id=item["queue_id"],
                          state=item["state"], error=result.getErrorMessage())
                d.errback(result)
            else:
                self._notify(item["queue_id"], item["state"])
                d.callback(item["queue_id"])
        return None

    # -- reading ------------------------------------------------------------------------------------

    def load(self, queue_id):
        _check_id(queue_id)
        d = self.db.run(_job_load, queue_id)
        return d.addCallback(lambda row: (row[0], Envelope.from_json(row[1]), row[2]))

    def load_with_state(self, queue_id):
        _check_id(queue_id)
        d = self.db.run(_job_load_with_state, queue_id)
        return d.addCallback(lambda row: (row[0], Envelope.from_json(row[1]), row[2], row[3]))

    def list(self, state=None):
        if state is not None:
            _check_state(state)
        d = self.db.run(_job_list, state)
        return d.addCallback(lambda rows: [(s, Envelope.from_json(e)) for s, e in rows])

    def load_state(self, queue_id):
        _check_id(queue_id)
        return self.db.run(_job_load_state, queue_id)

    # -- changes ------------------------------------------------------------------------------------

    def move(self, queue_id, state, claim=None):
        _check_state(state)
        _check_id(queue_id)
        d = self.db.run(_job_move, queue_id, state, _token(claim), self._notice("new"))
        return d.addCallback(self._moved, queue_id, state)

    def _moved(self, moved, queue_id, state):
        if moved:
            self._notify(queue_id, state)
        return None

    def remove(self, queue_id, claim=None):
        _check_id(queue_id)
        return self.db.run(_job_remove, queue_id, _token(claim))

    def save_state(self, queue_id, data, claim=None):
        _check_id(queue_id)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("state must be bytes, not %s" % (type(data).__name__,))
        return self.db.run(_job_save_state, queue_id, bytes(data), _token(claim))

    # -- claims -------------------------------------------------------------------------------------

    def _claim_of(self, row):
        queue_id, token, until = row
        return Claim(queue_id, self.node_id, token, until)

    def claim(self, queue_id):
        _check_id(queue_id)
        d = self.db.run(_job_claim, queue_id, self.node_id, self.lease)
        return d.addCallback(lambda row: None if row is None else self._claim_of(row))

    def claim_due(self, now, limit):
        d = self.db.run(_job_claim_due, self.node_id, self.lease, now, limit)
        return d.addCallback(lambda r: Due(tuple(self._claim_of(row) for row in r[0]), r[1]))

    def renew(self, claims):
        claims = list(claims)
        if not claims:
            return defer.succeed([])
        d = self.db.run(_job_renew, self.node_id, self.lease, [c.queue_id for c in claims],
                        [c.token for c in claims])

        def lost(renewed):
            kept = set(renewed)
            return [c.queue_id for c in claims if (c.queue_id, c.token) not in kept]

        return d.addCallback(lost)

    def release(self, claim):
        return self.db.run(_job_release, claim.queue_id, claim.token)

    def make_due(self, queue_ids, now):
        return self.db.run(_job_make_due, list(queue_ids), now, self._notice("due"))

    def holders(self, queue_ids):
        d = self.db.run(_job_holders, list(queue_ids))
        return d.addCallback(lambda rows: {q: (owner, until) for q, owner, until in rows})

    # -- notices ------------------------------------------------------------------------------------

    def _notice(self, what):
        return "%s %s" % (self._token, what)

    def subscribe(self, callback):
        return _add(self._subscribers, callback)

    def on_due(self, callback):
        return _add(self._due_callbacks, callback)

    def _notify(self, queue_id, state):
        for callback in list(self._subscribers):
            _call(callback, queue_id, state)

    def _heard(self, payload):
        """A notice on the channel (None: listening again after a gap): not our own, sweep."""
        if payload is not None and payload.split(" ", 1)[0] == self._token:
            return
        for callback in list(self._due_callbacks):
            _call(callback)

    # -- health -------------------------------------------------------------------------------------

    def check_writable(self):
        d = self.db.run(_job_probe)

        def probed(in_recovery):
            if in_recovery:
                return "database is a read-only standby (check target_session_attrs=read-write)"
            return True

        def failed(failure):
            failure.trap(QueueUnavailable)
            return failure.getErrorMessage()

        return d.addCallbacks(probed, failed)


def _token(claim):
    return None if claim is None else claim.token


def _add(callbacks, callback):
    """Append callback to the list callbacks; returns the function that takes it out again."""
    callbacks.append(callback)

    def remove():
        if callback in callbacks:
            callbacks.remove(callback)

    return remove


def _call(callback, *args):
    try:
        result = callback(*args)
    except Exception:
        log.failure("Queue subscriber {subscriber!r} failed", subscriber=callback)
        return
    if isinstance(result, defer.Deferred):
        result.addErrback(lambda f: log.failure("Queue subscriber {subscriber!r} failed", f,
                                                subscriber=callback))
