"""
What happened, for whoever listens: the protocol log, message tracking, metrics.

The listener, the scheduler and the SMTP client emit events here and know nothing of files or
Prometheus; consumers subscribe.  Two kinds:

- "protocol": one SMTP command, reply or session step.  Fields: session, listener (inbound) or
  route (outbound), direction ("in" | "out"), local, remote, event ("connect", "command",
  "reply", "tls", "disconnect"), data.  AUTH secrets are masked and message bodies never appear.
- "tracking": one step in a message's life.  Fields: event (RECEIVE, REJECT, AUTH_FAIL, DEFER,
  DELIVER, BOUNCE, EXPIRE, QUARANTINE, RELEASE, DELETE, DSN) and what is known of queue_id,
  message_id, sender, recipients, size, client, listener, user, verdicts, latency, stage, reply,
  remote_host, route, tls.

Every event also gets "time" (POSIX seconds from the injected clock).  An observer that raises is
logged and never disturbs mail flow.
"""

from twisted.logger import Logger

log = Logger()


class EventBus:
    def __init__(self, clock):
        self.clock = clock
        self._observers = []

    def subscribe(self, observer):
        """observer(kind, fields) for every event; returns a function that unsubscribes it."""
        self._observers.append(observer)

        def unsubscribe():
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def emit(self, kind, **fields):
        if not self._observers:
            return
        fields["time"] = self.clock.seconds()
        for observer in list(self._observers):
            try:
                observer(kind, fields)
            except Exception:
                log.failure("event observer {observer!r} failed", observer=observer)

    def relay(self, kind, fields):
        """An event another process emitted (its fields have their time): pass it on as it is."""
        for observer in list(self._observers):
            try:
                observer(kind, fields)
            except Exception:
                log.failure("event observer {observer!r} failed", observer=observer)

    def track(self, event, **fields):
        self.emit("tracking", event=event, **fields)


def message_id(data):
    """The Message-ID of a message (bytes, CRLF), from its header block only; None if absent."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    lower = head.lower()
    at = lower.find(b"\nmessage-id:") + 1 if not lower.startswith(b"message-id:") else 0
    if at == 0 and not lower.startswith(b"message-id:"):
        return None
    line_end = head.find(b"\r\n", at)
    value = head[at + len(b"message-id:"):line_end if line_end >= 0 else len(head)]
    # Folded values continue on lines starting with white space.
    while line_end >= 0 and head[line_end + 2:line_end + 3] in (b" ", b"\t"):
        next_end = head.find(b"\r\n", line_end + 2)
        value += head[line_end + 2:next_end if next_end >= 0 else len(head)]
        line_end = next_end
    text = value.decode("ascii", "replace").strip()
    return text or None
