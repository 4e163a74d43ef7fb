"""
The filter chain: runs a listener's filters at each SMTP stage and turns their verdicts into what
the listener understands (its `hooks`, see mailgate.smtp.server.SMTPFactory).

At each stage (connect, helo, mail, rcpt, data) the filters that have that hook run in order, one
at a time, each hook answering with a mailgate.verdict.Verdict or a Deferred of one:

- reject / tempfail end the chain: the listener gets the verdict's Reply; later filters are not
  called.  A refused MAIL or RCPT leaves session.transaction as it was before the command (its
  entries are copied one level deep before the command's filters run, and put back).
- accept skips the remaining filters of this stage only.
- quarantine marks the transaction (the whole session at connect and helo): the message is queued
  in state "quarantine", the reasons joined in DataResult.reason.
- headers given by verdicts of the transaction (and of connect and helo) are added at end of data;
  a verdict's message (on_data only) replaces the message for later filters and for the queue.
- a hook that raises, answers with anything but a Verdict (or a Verdict adding a header with an
  invalid name), or does not answer within [filters] timeout gives 451 4.3.0 and a logged
  traceback; its Deferred is cancelled.  The gateway goes on.

At end of data the message is parsed once in the thread pool, the data filters run, then our
Authentication-Results field (from the AuthResult values filters append to
session.transaction["auth_results"]) and the verdicts' headers are put on top of the message,
after every Authentication-Results field claiming our hostname has been removed.  Every verdict is
logged and recorded as a (filter, action) pair in DataResult.verdicts.

When context.events (a mailgate.events.EventBus) is set, every verdict is also emitted as a
"verdict" event with the fields filter (its name), action (the verdict's), stage ("connect",
"helo", "mail", "rcpt", "data"), session (the session id) and queue_id (at data; None before).  A
hook that fails or times out (the 451 above) is emitted with action "error".
"""

import email
import email.message
import email.policy
import re
import weakref
from email.header import Header

import attr
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate.filters import authresults
from mailgate.envelope import Reply
from mailgate.message import Message
from mailgate.verdict import AuthResult, DataResult, Verdict

log = Logger()

TEMP_FAIL = Reply(451, "4.3.0", "Temporary failure, please try again later")
STAGES = ("connect", "helo", "mail", "rcpt", "data")
RECORD = "mailgate.chain"  # the chain's own entry in session.transaction
AUTH_RESULTS = "auth_results"  # where filters append mailgate.verdict.AuthResult values

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext


class FilterError(Exception):
    """A filter answered with something the chain cannot use."""


def parse(raw):
    """The message bytes as an email.message.EmailMessage (run in a thread: it can be 35 MB)."""
    return email.message_from_bytes(raw, policy=email.policy.default)


def serialize(parsed):
    """A replacement message as bytes with CRLF line ends (run in a thread too)."""
    return parsed.as_bytes(policy=email.policy.SMTP)


def header_field(name, value):
    """
    One header field as bytes ending with CRLF: value made one line (no CR, LF or other control
    character can get through), folded at 78 characters where possible, RFC 2047 encoded when
    it is not ASCII.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError("invalid header field name %r" % (name,))
    value = authresults.sanitize(value)
    if not value:
        return ("%s:\r\n" % name).encode("ascii")
    if value.isascii():
        text = authresults.fold("%s: %s" % (name, value))
    else:
        text = "%s: %s" % (name, Header(value, "utf-8", header_name=name).encode(linesep="\r\n"))
    return (text + "\r\n").encode("ascii")


@attr.s(slots=True)
class _Record:
    """What the verdicts of one scope (the session's connect or helo, or a transaction) said."""

    verdicts = attr.ib(factory=list)  # (filter name, action)
    headers = attr.ib(factory=list)  # (name, value)
    quarantine = attr.ib(factory=list)  # reasons

    def copy(self):
        return _Record(list(self.verdicts), list(self.headers), list(self.quarantine))


def _snapshot(transaction):
    def copy(v):
        if isinstance(v, (list, dict, _Record)):
            return v.copy()
        return v

    return {k: copy(v) for k, v in transaction.items()}


def _restore(transaction, snapshot):
    transaction.clear()
    transaction.update(snapshot)


class _Current:
    """The message the data filters see; replaced by a verdict's message."""

    def __init__(self, message):
        self.message = message


class FilterChain:
    """
    The listener's hooks object for filters (objects with a name and IFilter hooks, in order),
    context (a mailgate.filters.FilterContext) and hostname (our authserv-id).
    """

    def __init__(self, filters, context, hostname):
        self.filters = tuple(filters)
        self.context = context
        self.hostname = hostname
        self.timeout = context.config.filters.timeout
        self._hooked = {
            stage: [(f, getattr(f, "on_" + stage)) for f in self.filters
                    if callable(getattr(f, "on_" + stage, None))]
            for stage in STAGES}
        self._sessions = weakref.WeakKeyDictionary()  # Session -> {"connect": _Record, ...}

    def __repr__(self):
        return "<FilterChain %s>" % ", ".join(f.name for f in self.filters)

    # -- the listener's hooks ----------------------------------------------------------------

    def on_connect(self, session):
        record = _Record()
        self._sessions[session] = {"connect": record}
        return self._stage("connect", session, record, ())

    def on_helo(self, session):
        # A second EHLO (after STARTTLS) replaces what the first one's filters said.
        record = _Record()
        self._sessions.setdefault(session, {})["helo"] = record
        return self._stage("helo", session, record, ())

    def on_mail(self, session, sender):
        return self._command("mail", session, (sender,))

    def on_rcpt(self, session, recipient):
        return self._command("rcpt", session, (recipient,))

    def on_data(self, session, envelope, data):
        """Fires with a DataResult, or a Reply when the chain refuses the message."""
        return self._data(session, envelope, data)

    # -- stages ------------------------------------------------------------------------------

    def _transaction_record(self, session):
        record = session.transaction.get(RECORD)
        if not isinstance(record, _Record):
            record = session.transaction[RECORD] = _Record()
        return record

    def _command(self, stage, session, args):
        if not self._hooked[stage]:
            return None
        before = _snapshot(session.transaction)

        def done(reply):
            if reply is not None:
                _restore(session.transaction, before)
            return reply

        d = self._stage(stage, session, self._transaction_record(session), args)
        return d.addCallback(done)

    @defer.inlineCallbacks
    def _stage(self, stage, session, record, args, current=None, queue_id=None):
        """Fires with None (go on) or the Reply that ends the chain."""
        for f, hook in self._hooked[stage]:
            if current is not None:
                args = (current.message,)
            try:
                verdict = yield self._call(f, hook, session, args)
            except Exception:
                self._failed(Failure(), f, stage, session, queue_id)
                self._emit(f, "error", stage, session, queue_id)
                return TEMP_FAIL
            self._log(f, stage, verdict, session, queue_id)
            self._emit(f, verdict.action, stage, session, queue_id)
            record.verdicts.append((f.name, verdict.action))
            if verdict.ends_chain:
                return verdict.reply
            record.headers.extend(verdict.headers)
            if verdict.action == "quarantine":
                record.quarantine.append(verdict.reason or f.name)
            if verdict.message is not None:
                if current is None:
                    log.warn("filter {filter} replaced the message at {stage}: ignored (on_data "
                             "only)", filter=f.name, stage=stage, session=session.id)
                else:
                    try:
                        raw = yield self._run_in_thread(serialize, verdict.message)
                    except Exception:
                        self._failed(Failure(), f, stage, session, queue_id)
                        return TEMP_FAIL
                    current.message = Message(current.message.envelope, raw, verdict.message)
            if verdict.action == "accept":
                break
        return None

    def _call(self, f, hook, session, args):
        d = defer.maybeDeferred(hook, session, *args)
        if not d.called and self.timeout:
            d.addTimeout(self.timeout, self.context.reactor)
        return d.addCallback(self._check, f)

    @staticmethod
    def _check(verdict, f):
        if not isinstance(verdict, Verdict):
            raise FilterError("filter %s answered %r, not a Verdict" % (f.name, verdict))
        for name, _ in verdict.headers:
            if not _FIELD_NAME.fullmatch(name):
                raise FilterError("filter %s added a header with an invalid name %r" % (f.name, name))
        if verdict.message is not None and not isinstance(verdict.message, email.message.Message):
            raise FilterError("filter %s replaced the message with %r, not an email.message.Message"
                              % (f.name, type(verdict.message)))
        return verdict

    def _failed(self, failure, f, stage, session, queue_id):
        if failure.check(defer.TimeoutError):
            why = "did not answer within %gs" % (self.timeout,)
        else:
            why = "failed"
        log.failure("filter {filter} {why} at {stage} in session {session}: 451 4.3.0", failure,
                    filter=f.name, why=why, stage=stage, session=session.id, queue_id=queue_id)

    def _log(self, f, stage, verdict, session, queue_id):
        emit = log.debug if verdict.action == "next" else log.info
        emit("filter {filter} at {stage}: {action}{why} session={session}{queue}",
             filter=f.name, stage=stage, action=verdict.action, reason=verdict.reason,
             session=session.id, queue_id=queue_id,
             why=" (%s)" % (verdict.reason,) if verdict.reason else "",
             queue=" queue_id=%s" % (queue_id,) if queue_id else "")

    def _emit(self, f, action, stage, session, queue_id):
        events = getattr(self.context, "events", None)
        if events is not None:
            events.emit("verdict", filter=f.name, action=action, stage=stage, session=session.id,
                        queue_id=queue_id)

    def _run_in_thread(self, f, *args):
        run = self.context.run_in_thread
        if run is None:
            reactor = self.context.reactor
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        return run(f, *args)

    # -- end of data -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _data(self, session, envelope, raw):
        record = self._transaction_record(session)
        queue_id = envelope.queue_id
        if self._hooked["data"]:
            try:
                parsed = yield self._run_in_thread(parse, raw)
            except Exception:
                log.failure("could not parse message {queue_id} in session {session}: 451 4.3.0",
                            Failure(), queue_id=queue_id, session=session.id)
                return TEMP_FAIL
            current = _Current(Message(envelope, raw, parsed))
            refused = yield self._stage("data", session, record, (), current, queue_id)
            if refused is not None:
                return refused
            raw = current.message.raw
        return self._result(session, record, raw, queue_id)

    def _result(self, session, record, raw, queue_id):
        scopes = self._sessions.get(session, {})
        records = [r for r in (scopes.get("connect"), scopes.get("helo"), record) if r is not None]
        verdicts = [v for r in records for v in r.verdicts]
        headers = [h for r in records for h in r.headers]
        reasons = [q for r in records for q in r.quarantine]
        top = [header_field(name, value) for name, value in headers]
        results = session.transaction.get(AUTH_RESULTS) or []
        valid = [r for r in results if isinstance(r, AuthResult)]
        if len(valid) != len(results):
            log.warn("ignored {n} auth results that are not AuthResult values in {queue_id}",
                     n=len(results) - len(valid), queue_id=queue_id, session=session.id)
        if valid:
            top.insert(0, authresults.header(self.hostname, valid))
        state = "quarantine" if reasons else "active"
        reason = "; ".join(reasons) if reasons else None
        if verdicts:  # a listener without filters has nothing to say here, per message
            log.info("filters done for {queue_id}: {state}{why}", queue_id=queue_id, state=state,
                     why=" (%s)" % (reason,) if reason else "", reason=reason, session=session.id,
                     verdicts=verdicts)
        data = b"".join(top) + authresults.strip_forged(raw, self.hostname)
        return DataResult(data, state, verdicts, reason)
