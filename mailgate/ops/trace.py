"""
`mailgate trace QUERY`: the life of a message, rebuilt from tracking.log and protocol.log.

    messages = find(log_dir, "Q0001", since=None, until=None)   # [Message], oldest first
    for line in text_lines(messages): print(line)                # or json_lines(messages)

QUERY is a queue id, a Message-ID (with or without <>) or an address (a sender or a recipient,
without regard to case): whatever it matches.  A message is every tracking event of its queue id
(the DSN it caused is a message of its own, included too), plus the protocol events of its
sessions: the inbound one (RECEIVE and REJECT carry "session") and the outbound ones.  A
DELIVER, DEFER or BOUNCE that got a reply from a remote server names its outbound session
("session"); one that did not (a connection refused, a DNS failure) is matched to a session of
the message by: the same route, a session that began after the
message's previous event for those recipients (or its RECEIVE) and ended by E's time (+1 s), and
MAIL FROM = E's sender with a RCPT TO among E's recipients, or, for a session that ended before
RCPT, the Message-ID its "connect" event carries (mailgate.delivery.client).  Refused (REJECT) mail
without a queue id is grouped by the inbound session.

Files are read line by line, rotated ones first, oldest first (never loaded whole): tracking logs
once, then protocol logs once.  Files entirely outside --since/--until are skipped by their
names; lines are pre-filtered on their raw bytes before any JSON is parsed.
"""

import datetime
import json
import os
import re

from mailgate.ops.logs import iso_time, log_files

OUTCOMES = ("DELIVER", "DEFER", "BOUNCE")
_SLACK = 60.0  # seconds a line may be out of its file's time span (clock steps)
_AFTER = 1.0  # seconds an outbound session may end after the event that reports it
_MAX_SESSION_EVENTS = 10000  # per buffered outbound session, a bound on memory
_TIME_PREFIX = b'{"time":"'
_UTC = datetime.timezone.utc


class TraceError(Exception):
    """Something the user must be told in one line (no logs, no match, a bad time)."""


# --- times ---------------------------------------------------------------------------------------


def parse_when(text, end=False):
    """
    An ISO date or date and time (UTC unless it says otherwise) as the logs' time string.  A date
    alone is its first millisecond, or with end=True its last (--until 2026-11-28: the whole day).
    """
    value = text.strip()
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            day = datetime.date.fromisoformat(value)
            moment = datetime.datetime(day.year, day.month, day.day, tzinfo=_UTC)
            if end:
                moment += datetime.timedelta(days=1, milliseconds=-1)
        else:
            if value[-1:] in ("Z", "z"):
                value = value[:-1] + "+00:00"
            moment = datetime.datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_UTC)
    except (ValueError, OverflowError):
        raise TraceError("expected an ISO date or time like 2026-11-28 or 2026-11-28T23:46:21Z,"
                         " got %r" % (text,)) from None
    return iso_time(moment.timestamp())


def _seconds(stamp):
    moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=_UTC).timestamp()


# --- reading -------------------------------------------------------------------------------------


def _stamped(directory, kind, since, until):
    """
    (time as bytes, line) for every line of kind's logs in [since, until], oldest file first.
    The hot loop: bytes only, nothing parsed; a line that does not start with its time, as
    mailgate.ops.logs writes them, is not ours (or a torn one) and is skipped.
    """
    low = since.encode("ascii") if since else b""
    high = until.encode("ascii") if until else b"~"
    for start, end, path in log_files(directory, kind):
        if since is not None and end is not None and iso_time(end + _SLACK) < since:
            continue
        if until is not None and start is not None and iso_time(max(start - _SLACK, 0)) > until:
            continue
        with open(path, "rb") as f:
            for raw in f:
                stamp = raw[9:33]
                if low <= stamp <= high and raw[:9] == _TIME_PREFIX:
                    yield stamp, raw


def _parse(raw):
    try:
        event = json.loads(raw)
    except ValueError:
        return None  # a line cut short by a crash, or not ours
    return event if isinstance(event, dict) and isinstance(event.get("time"), str) else None


def _field(raw, prefix):
    """The string value (bytes) of a key (prefix = b'"key":"') in a raw line, without parsing."""
    at = raw.find(prefix)
    if at < 0:
        return None
    at += len(prefix)
    return raw[at:raw.find(b'"', at)]


def _strip(text):
    text = text.strip()
    return text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text


def _lower(value):
    return value.lower() if isinstance(value, str) else None


class _Query:
    def __init__(self, text):
        self.text = text.strip()
        self.lower = _strip(self.text).lower()
        if not self.lower:
            raise TraceError("nothing to look for: give a queue id, a Message-ID or an address")
        self.needle = json.dumps(self.lower)[1:-1].encode("ascii")  # as it is in a (lowered) line

    def matches(self, event):
        if event.get("queue_id") in (self.text, _strip(self.text)):
            return True
        mid = event.get("message_id")
        if isinstance(mid, str) and _strip(mid).lower() == self.lower:
            return True
        addresses = [event.get("sender"), event.get("user_attempted")]
        recipients = event.get("recipients")
        addresses += recipients if isinstance(recipients, list) else []
        if any(_lower(a) == self.lower for a in addresses):
            return True
        # A refused MAIL or RCPT names the refused address only in its reply.
        reply = event.get("reply") if event.get("event") == "REJECT" else None
        return isinstance(reply, str) and "<%s>" % self.lower in reply.lower()


# --- the result ----------------------------------------------------------------------------------


class Message:
    """One queued message (key: its queue id) or one session's refused mail (key: session:ID)."""

    def __init__(self, key):
        self.key = key
        self.tracking = []  # events, in file order
        self.protocol = {}  # session id -> its events
        self.dsn_for = None  # the queue id whose DSN this is

    def timeline(self):
        """[(kind, event)] by time; at one millisecond protocol lines first, then file order."""
        items = [(e["time"], 0, i, "protocol", e) for i, e in enumerate(
            e for events in self.protocol.values() for e in events)]
        items += [(e["time"], 1, i, "tracking", e) for i, e in enumerate(self.tracking)]
        return [(kind, event) for _, _, _, kind, event in sorted(items, key=lambda x: x[:3])]

    def first(self, name):
        for event in self.tracking:
            if event.get(name) not in (None, []):
                return event[name]
        return None


def find(directory, query, since=None, until=None):
    """The messages matching query ([Message], oldest first); since/until are log time strings."""
    if not os.path.isdir(directory):
        raise TraceError("no log directory %s" % (directory,))
    query = _Query(query)
    messages = _tracking(directory, query, since, until)
    if messages:
        _protocol(directory, messages, since, until)
    return sorted(messages.values(), key=lambda m: m.tracking[0]["time"])


def _tracking(directory, query, since, until):
    messages, wanted, wanted_raw = {}, set(), set()  # queue ids (str and bytes)
    for _, raw in _stamped(directory, "tracking", since, until):
        if _field(raw, b'"queue_id":"') not in wanted_raw and query.needle not in raw.lower():
            continue
        event = _parse(raw)
        if event is None:
            continue
        qid = event.get("queue_id")
        if qid not in wanted and not query.matches(event):
            continue
        if qid:
            wanted.add(qid)
            wanted_raw.add(json.dumps(qid)[1:-1].encode("ascii"))
            key = qid
        else:
            key = "session:%s" % (event.get("session") or "?",)
        messages.setdefault(key, Message(key)).tracking.append(event)
        dsn = event.get("dsn_queue_id")
        if dsn:
            wanted.add(dsn)
            wanted_raw.add(json.dumps(dsn)[1:-1].encode("ascii"))
            messages.setdefault(dsn, Message(dsn)).dsn_for = qid
    return {k: m for k, m in messages.items() if m.tracking}


class _Claim:
    """An outcome event of a message, and what an outbound session must be to belong to it."""

    def __init__(self, message, event, after):
        self.message = message
        self.route = event.get("route")
        self.after = after  # the session began at or after this (a time string or None)
        self.before = iso_time(_seconds(event["time"]) + _AFTER)
        self.sender = _lower(event.get("sender"))
        self.recipients = {_lower(r) for r in event.get("recipients") or ()}
        self.message_id = _strip(event["message_id"]) if event.get("message_id") else None
        named = event.get("sessions") or ([event["session"]] if event.get("session") else None)
        self.sessions = set(named) if named else None

    def accepts(self, session):
        if self.route != session.route:
            return False
        if self.sessions is not None:
            return session.id in self.sessions
        if (self.after is not None and session.start < self.after) or session.end > self.before:
            return False
        if session.message_id and self.message_id and session.message_id != self.message_id:
            return False
        if session.recipients:
            return session.mail_from == self.sender and bool(session.recipients & self.recipients)
        if session.mail_from is not None and session.mail_from != self.sender:
            return False
        if session.message_id and self.message_id:
            return session.message_id == self.message_id
        return session.mail_from is not None


def _claims(messages):
    claims = []
    for message in messages.values():
        previous = []  # (time, recipients) of RECEIVE and outcome events so far
        for event in message.tracking:
            kind = event.get("event")
            recipients = {_lower(r) for r in event.get("recipients") or ()}
            if kind in OUTCOMES and event.get("route"):
                earlier = [t for t, rs in previous
                           if t < event["time"] and (rs is None or rs & recipients)]
                claims.append(_Claim(message, event, max(earlier) if earlier else None))
            if kind == "RECEIVE":
                previous.append((event["time"], None))
            elif kind in OUTCOMES or kind == "EXPIRE":
                previous.append((event["time"], recipients))
    return claims


class _Outbound:
    """
    An outbound session being read, kept while it may belong to one of the claims.  Its lines
    stay raw; only MAIL FROM and RCPT TO are parsed now, the rest if the session is claimed.
    """

    def __init__(self, connect, raw):
        self.id = connect["session"]
        self.route = connect.get("route")
        self.start = self.end = connect["time"]
        self.message_id = _strip(connect["message_id"]) if connect.get("message_id") else None
        self.mail_from = None
        self.recipients = set()
        self.lines = [raw]

    def add(self, stamp, raw):
        self.end = stamp.decode("ascii")
        if len(self.lines) < _MAX_SESSION_EVENTS:
            self.lines.append(raw)
        if b"MAIL FROM:" in raw or b"RCPT TO:" in raw:  # as we send them (mailgate.delivery.client)
            event = _parse(raw)
            command = event is not None and event.get("event") == "command"
            data = (event.get("data") or "") if command else ""
            if data[:10] == "MAIL FROM:":
                self.mail_from = _path(data[10:])
            elif data[:8] == "RCPT TO:":
                self.recipients.add(_path(data[8:]))

    def events(self):
        return [e for e in map(_parse, self.lines) if e is not None]


def _path(text):
    text = text.strip()
    if text.startswith("<") and ">" in text:
        return text[1:text.index(">")].lower()
    return text.split(" ", 1)[0].lower()


def _protocol(directory, messages, since, until):
    inbound = {}  # session id (bytes, as in a line) -> the messages it carried
    for message in messages.values():
        for event in message.tracking:
            if event.get("session"):
                sid = json.dumps(event["session"])[1:-1].encode("ascii")
                inbound.setdefault(sid, []).append(message)
    claims = _claims(messages)
    routes = {c.route for c in claims}
    senders = {c.sender for c in claims}
    message_ids = {c.message_id for c in claims if c.message_id}
    afters = [c.after for c in claims]
    lowest = b"" if None in afters else min(afters, default="").encode("ascii")
    highest = max((c.before for c in claims), default="").encode("ascii")
    sessions, kept = {}, {}  # outbound sessions being read; session events kept

    def finish(session):
        owners = [c.message for c in claims if c.accepts(session)]
        if owners:
            events = session.events()
            for message in dict.fromkeys(owners):
                message.protocol[session.id] = events

    for stamp, raw in _stamped(directory, "protocol", since, until):
        # _field(raw, b'"session":"'), inline (this loop reads GBs), with a fast path for
        # mailgate.ops.logs' lines: the session (12 hex digits) right after the time.
        if raw[33:46] == b'","session":"' and raw[58:59] == b'"':
            sid = raw[46:58]
        else:
            sid = _field(raw, b'"session":"')
        if sid in inbound:
            event = _parse(raw)
            if event is not None:
                kept.setdefault(sid, []).append(event)
            continue
        if sid in sessions:
            session = sessions[sid]
            session.add(stamp, raw)
            gone = session.mail_from is not None and session.mail_from not in senders
            if gone and session.message_id not in message_ids:
                del sessions[sid]  # another message's
            elif b'"event":"disconnect"' in raw:
                finish(sessions.pop(sid))
            continue
        if not claims or stamp < lowest or stamp > highest:
            continue
        if b'"direction":"out"' not in raw or b'"event":"connect"' not in raw:
            continue
        event = _parse(raw)
        if event is not None and event.get("route") in routes and event.get("session") and sid:
            sessions[sid] = _Outbound(event, raw)
    for session in sessions.values():  # never disconnected (the log ends, or a crash)
        finish(session)
    for sid, events in kept.items():
        for message in inbound[sid]:
            message.protocol[events[0]["session"]] = events
    for message in messages.values():  # sessions in the order they began
        message.protocol = dict(sorted(message.protocol.items(), key=lambda i: i[1][0]["time"]))


# --- output --------------------------------------------------------------------------------------

_FIRST = ("sender", "recipients", "size", "client", "listener", "user", "user_attempted",
          "session", "route", "remote_host", "tls", "stage", "latency", "verdicts")
_HIDDEN = ("time", "event", "queue_id", "message_id", "reply")


def _value(value):
    if isinstance(value, float):
        return "%.3f" % value
    if isinstance(value, list):
        return ",".join(_value(v) if not isinstance(v, list) else ":".join(map(str, v))
                        for v in value)
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def _details(event):
    keys = [k for k in _FIRST if k in event]
    keys += [k for k in event if k not in _FIRST and k not in _HIDDEN]
    parts = []
    for key in keys:
        value = event[key]
        if value in ([], {}, None):
            continue
        if key == "sender":
            parts.append("from=<%s>" % value)
        elif key == "recipients":
            parts.append("to=" + ",".join("<%s>" % r for r in value))
        elif key == "latency" and isinstance(value, (int, float)):
            parts.append("latency=%.3fs" % value)
        else:
            parts.append("%s=%s" % (key, _value(value)))
    if "reply" in event:
        parts.append("reply: %s" % (event["reply"],))
    return " ".join(parts)


def _protocol_line(event):
    direction = event.get("direction", "?")
    head = "    %s  %-3s %s  %-10s " % (event["time"], direction, event.get("session", "?"),
                                        event.get("event", "?"))
    data = event.get("data") or ""
    if event.get("event") == "connect":
        if direction == "in":
            data = "from %s to %s (listener %s)" % (event.get("remote"), event.get("local"),
                                                    event.get("listener"))
        else:
            data = "to %s from %s (route %s: %s)" % (event.get("remote"), event.get("local"),
                                                     event.get("route"), data)
    lines = data.split("\n")
    return [(head + lines[0]).rstrip()] + [" " * len(head) + line for line in lines[1:]]


def _header(message):
    if message.key.startswith("session:"):
        return "session %s: refused mail (no queue id)" % (message.key[8:],)
    parts = [message.key]
    mid = message.first("message_id")
    if mid:
        parts.append("message-id %s" % (mid,))
    sender = message.first("sender")
    if sender is not None:
        parts.append("from <%s>" % (sender,))
    recipients = message.first("recipients")
    if recipients:
        parts.append("to " + ", ".join("<%s>" % (r,) for r in recipients))
    if message.dsn_for:
        parts.append("(delivery status notification for %s)" % (message.dsn_for,))
    return "  ".join(parts)


def text_lines(messages):
    """The readable timeline: a header per message, one line per step, protocol lines indented."""
    for n, message in enumerate(messages):
        if n:
            yield ""
        yield _header(message)
        for kind, event in message.timeline():
            if kind == "protocol":
                yield from _protocol_line(event)
            else:
                yield "%s  %-10s %s" % (event["time"], event.get("event", "?"), _details(event))


def json_lines(messages):
    """Every event as stored, with "kind" (tracking or protocol) and "trace" (the message's key)."""
    for message in messages:
        for kind, event in message.timeline():
            record = {"time": event["time"], "kind": kind}
            record.update((k, v) for k, v in event.items() if k != "time")
            record["trace"] = message.key
            yield json.dumps(record, separators=(",", ":"))


def _option(name, text, end=False):
    if not text:
        return None
    try:
        return parse_when(text, end)
    except TraceError as e:
        raise TraceError("--%s: %s" % (name, e)) from None


def run(args, out):
    """The `mailgate trace` subcommand (args from mailgate.cli); out(line) prints.  -> status."""
    from mailgate.config import config_file, load_config

    path = config_file(args.config)
    config = load_config(path)
    directory = config.logging.dir
    if directory is None:
        raise TraceError("%s: [logging] dir is not set: there are no logs to trace" % (path,))
    since = _option("since", args.since)
    until = _option("until", args.until, end=True)
    try:
        messages = find(directory, args.query, since, until)
    except OSError as e:
        raise TraceError("%s: %s" % (e.filename or directory, e.strerror or e)) from None
    if not messages:
        window = (" since %s" % since if since else "") + (" until %s" % until if until else "")
        raise TraceError("no message matches %s in %s%s" % (args.query, directory, window))
    for line in (json_lines if args.json else text_lines)(messages):
        out(line)
    return 0
