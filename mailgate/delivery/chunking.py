"""
Outbound CHUNKING (RFC 3030): the message in BDAT chunks instead of DATA, when the next hop
offers CHUNKING and [delivery] chunking is on (mailgate.delivery.extensions decides).

BDAT carries the octets as they are: no dot-stuffing, no end marker; line endings are made CRLF
once (the spool holds CRLF already; a bare CR or LF would otherwise reach the hop as is).  The
message goes in chunks of CHUNK octets, each BDAT answered before the next is sent; the last says
LAST, and its reply is the one that counts for the message, as the reply to DATA's final dot
does.  A refused chunk ends the transaction with that reply (RFC 3030 2: nothing more is sent).
[delivery] data_timeout covers the whole transfer, command_timeout each reply.
"""

import re

from twisted.mail import smtp

CHUNK = 1024 * 1024

_NEWLINE = re.compile(rb"\r\n|\r|\n")


def crlf(data):
    """data with every line ending CRLF (CR LF stays one line end)."""
    return _NEWLINE.sub(b"\r\n", data)


class BDATSending:
    """A mixin for mailgate.delivery.client.DeliverySender: send the message with BDAT."""

    def _startBDAT(self):
        self.phase = "BDAT"
        self._bdatData = crlf(self.factory.data)
        self._bdatAt = 0
        self._dataTimer = self.factory.reactor.callLater(self.factory.data_timeout,
                                                         self._dataTimedOut)
        self._expected = smtp.SUCCESS
        self._okresponse = self._bdatAccepted
        self._failresponse = self.smtpState_msgSent  # the refusal is the message's outcome
        self._sendChunk()

    def _sendChunk(self):
        piece = self._bdatData[self._bdatAt:self._bdatAt + CHUNK]
        self._bdatAt += len(piece)
        self._bdatLast = self._bdatAt >= len(self._bdatData)
        self.sendLine(b"BDAT %d%s" % (len(piece), b" LAST" if self._bdatLast else b""))
        self.transport.write(piece)

    def _bdatAccepted(self, code, resp):
        if self._bdatLast:
            self._bdatData = None
            return self.smtpState_msgSent(code, resp)
        self._sendChunk()
