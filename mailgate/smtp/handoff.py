"""
End of data: from the scanned message to the queue, and what the client is told.

This is where the durability guarantee is kept on the receiving side: a message is answered
250 only once IQueue.enqueue has fired (the backend's promise that envelope and body survive a
crash).  The order is fixed: the scanner's verdict on the raw bytes, the filters' on_data, our
Received header, enqueue (once, whatever the number of recipients), then the reply.  Any failure
on the way (a filter that crashed, a queue that could not write) is a failed Deferred, which the
protocol answers with 451 4.3.0: never a 5xx, never a 250.
"""

import attr
from twisted.logger import Logger

from mailgate import headerfirewall
from mailgate.envelope import Reply
from mailgate.events import message_id
from mailgate.smtp import replies
from mailgate.smtp.received import received_header

log = Logger()


def scan_problem(scanner):
    """The rejection a finished DataScanner calls for, or None when the message may go on."""
    if scanner.too_big:
        return replies.TOO_BIG
    if scanner.bare_newline:
        return replies.BARE_NEWLINE
    if scanner.line_too_long:
        return replies.LONG_LINE
    return None


@attr.s(frozen=True, slots=True)
class Queued:
    """A message the queue has committed: what the 250 and the RECEIVE tracking event say."""

    queue_id = attr.ib()
    envelope = attr.ib()  # as stored: size includes our Received header, verdicts filled in
    state = attr.ib()  # "active" or "quarantine"
    reason = attr.ib()  # the quarantine reason, or None
    message_id = attr.ib()

    def tracking(self, latency):
        """The fields of the RECEIVE (and QUARANTINE) tracking events."""
        envelope = self.envelope
        return dict(queue_id=self.queue_id, message_id=self.message_id, sender=envelope.sender,
                    recipients=list(envelope.recipients), size=envelope.size,
                    verdicts=[list(v) for v in envelope.verdicts], tls=envelope.tls_version,
                    latency=latency)


def hand_off(queue, hostname, envelope, message, result, strip=()):
    """
    result is what the filters' on_data gave: None (queue as is), a Reply, or a
    mailgate.verdict.DataResult.  Fires with a refusing Reply (the filters said no) or a Queued;
    fails when the queue did not commit.  strip: the header firewall's patterns (the filters saw
    the message as it came; what is queued has those fields removed).
    """
    if isinstance(result, Reply):
        if not result.is_positive:
            return result
        result = None
    state, reason = "active", None
    if result is not None:
        message, state, reason = result.data, result.state, result.reason
        envelope = attr.evolve(envelope, verdicts=result.verdicts)
    message, removed = headerfirewall.strip(message, strip)
    if removed:
        log.info("header firewall removed {count} header field(s) from {queue_id}: {names}",
                 count=sum(removed.values()), queue_id=envelope.queue_id,
                 names=", ".join("%s x%d" % item for item in sorted(removed.items())),
                 removed=removed)
    data = received_header(envelope, hostname) + message
    envelope = attr.evolve(envelope, size=len(data))
    d = queue.enqueue(envelope, data, state)
    return d.addCallback(lambda queue_id: Queued(queue_id, envelope, state, reason, message_id(message)))
