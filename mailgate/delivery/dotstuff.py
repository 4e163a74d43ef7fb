"""
The DATA transform of outbound delivery: dot-stuffing and CRLF, chunk by chunk.

Owned here because twisted.mail.smtp gets both wrong (../shared/twisted-mail-notes.md) and the
fix is pure byte handling, with no protocol state; DeliverySender (mailgate.delivery.client)
feeds it the chunks FileSender reads.

C1/C2  DATA goes through DotStuffer: every line that starts with "." is stuffed, the "at start of
       line" state and a trailing CR are carried across the 16 KiB chunks FileSender reads, and
       only CRLF goes out (our spool is CRLF already; a stray bare CR or LF becomes CRLF, a CRLF
       never becomes CR CR LF).
"""

import re

_NEWLINE = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """
    The DATA transform, fed chunk by chunk (C1, C2): every line ending becomes CRLF (CR LF split
    across two chunks stays one CRLF), every line starting with "." gets one more, including the
    first line of the message and a line that starts exactly at a chunk boundary.  finish() gives
    what ends the transfer: a CRLF if the message did not end with one, then ".CRLF".
    """

    def __init__(self):
        self.at_line_start = True
        self._held_cr = False

    def feed(self, chunk):
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            # Might be the first half of a CRLF: decide with the next chunk.
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        out = _NEWLINE.sub(b"\r\n", chunk).replace(b"\r\n.", b"\r\n..")
        if self.at_line_start and out.startswith(b"."):
            out = b"." + out
        self.at_line_start = out.endswith(b"\r\n")
        return out

    def finish(self):
        tail = b""
        if self._held_cr:
            tail, self._held_cr, self.at_line_start = b"\r\n", False, True
        if not self.at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


def stuff(data):
    """The whole of DATA for a message at once (the same transform, for tests and tools)."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()
