"""
The per-attempt transcript of outbound delivery: each SMTP session's id and the "protocol"
events DeliverySender (mailgate.delivery.client) emits through the EventBus.

Owned here, apart from the dialogue, because it only watches it: nothing in this module changes
what is sent or how replies are handled, and it is where credentials are kept out of the events.

Protocol events (events, a mailgate.events.EventBus, given to Deliverer): every connection is a
session (a fresh id) emitting "protocol" events with session, route, direction "out", local,
remote (ip:port), event and data: "connect" (data: the hop and the TLS policy; message_id: the
Message-ID of the message being delivered, when it has one, so mailgate.ops.trace can tell which
message a session was for even when it failed before MAIL), "command" (each line we send),
"reply" (each complete reply, its lines joined by "\\n"), "tls" (version and cipher, once the
handshake is done) and "disconnect" (data: why, when not a clean close).  Credentials never
appear: AUTH's initial response and every SASL response are "****".  The message itself is never
an event (DATA goes through the transport, not sendLine): only the DATA command and the replies.
"""

import secrets

from twisted.internet import error

from mailgate.delivery.outcome import _describe, _label

_REPLY_LINES = 100  # a longer reply is reported in several "reply" events
_EVENT_LINE = 1000  # characters of one reply line kept in an event


class Transcript:
    """
    One SMTP session's protocol events on events (a mailgate.events.EventBus; None: no events,
    nothing is looked at), for route over transport.  session is the session's fresh id, also
    given to each RecipientResult of the session.
    """

    def __init__(self, events, route, transport):
        self.session = secrets.token_hex(6)
        self.events = events
        self._route = route
        self._replyLines = []
        self._sasl = False  # an AUTH exchange is in progress: what we send are credentials
        self._quitState = None  # "sent", then "answered": the close that follows is the normal end
        if events is not None:
            local, peer = transport.getHost(), transport.getPeer()
            self._local = "%s:%s" % (getattr(local, "host", ""), getattr(local, "port", ""))
            self._remote = "%s:%s" % (getattr(peer, "host", ""), getattr(peer, "port", ""))

    def _event(self, event, data="", **extra):
        self.events.emit(
            "protocol", session=self.session, route=self._route.name, direction="out",
            local=self._local, remote=self._remote, event=event, data=data, **extra)

    def connect(self, hop, policy, message_id):
        """The connection to hop is made (tls = policy, for the message with message_id)."""
        if self.events is not None:
            self._event("connect", "%s tls=%s" % (_label(hop), policy), message_id=message_id)

    def transaction(self, message_id):
        """A further transaction starts on this connection (kept open), for message_id."""
        if self.events is not None:
            self._event("transaction", "", message_id=message_id)

    def command(self, line):
        """We send line."""
        if self.events is not None:
            self._event("command", self._masked(line))
            if line == b"QUIT":
                self._quitState = "sent"

    def _masked(self, line):
        if self._sasl:
            return "****"  # a SASL response (or "*"): credentials
        text = line.decode("utf-8", "replace")
        if text[:5].upper() == "AUTH ":
            self._sasl = True
            words = text.split(" ")
            return " ".join(words[:2] + ["****"] * (len(words) > 2))
        return text

    def reply_line(self, line):
        """We received one line of a reply."""
        if self.events is not None:
            self._replyLines.append(line[:_EVENT_LINE].decode("utf-8", "replace"))
            if line[3:4] != b"-" or len(self._replyLines) >= _REPLY_LINES:
                self._reportReply()

    def _reportReply(self):
        lines, self._replyLines = self._replyLines, []
        if lines:
            if self._sasl and not lines[-1].startswith("334"):
                self._sasl = False
            if self._quitState == "sent":
                self._quitState = "answered"
            self._event("reply", "\n".join(lines))

    def tls(self, version, cipher):
        """The TLS handshake is done."""
        if self.events is not None:
            self._event("tls", "%s %s" % (version, cipher))

    def disconnect(self, reason):
        """The connection is gone (reason: a Failure, or None)."""
        if self.events is not None:
            self._reportReply()  # a reply cut short
            # After our QUIT was answered, any close is the normal end (many servers close TLS
            # without close_notify); before it, say why the connection went.
            clean = (reason is None or reason.check(error.ConnectionDone)
                     or self._quitState == "answered")
            self._event("disconnect", "" if clean else _describe(reason))
