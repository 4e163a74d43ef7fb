"""
CHUNKING (RFC 3030): BDAT, the other way to send a message, as Exchange does.

`BDAT <size> [LAST]` is followed by exactly size octets of message, not dot-stuffed, with no end
marker; the last chunk says LAST and gets the same end-of-message processing as DATA (filters,
Received header, queue, then 250 after the commit).  The framing rules keep the properties the
DATA path has (../shared/twisted-mail-notes.md S1-S7):

- A BDAT with a valid size is always followed by that many octets, whatever else is wrong (no
  MAIL, no RCPT, TLS required, the size over the limit, a transaction that failed): they are
  read and thrown away before the error reply, so chunk content can never run as commands.  A
  BDAT whose size cannot be read cannot be framed: 501 and the connection is closed.
- Octets inside a chunk are content: a "<CRLF>.<CRLF>", a pipelined "MAIL FROM" or "QUIT" in a
  chunk is part of the message.  Commands pipelined after a chunk run after its reply, in order.
- The size of every chunk is checked against max_message_size before it is read (552 5.3.4,
  the transaction is over); nothing beyond the limit is ever held.
- The message must be what DATA accepts: CRLF lines only (bare CR or LF: 550 5.6.0) of at most
  998 octets (554 5.6.0), checked by the same scanner after the last chunk.  BINARYMIME is not
  offered: the spool, the filters and delivery by DATA need text.
- DATA in a transaction that began with BDAT is 503; a failed BDAT ends the transaction, so
  later chunks get 503 (their octets read and dropped) until a new MAIL.
"""

import re

from mailgate.envelope import Reply
from mailgate.smtp import replies
from mailgate.smtp.datascan import DataScanner

BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA cannot be mixed with BDAT in one transaction")

_BDAT_RE = re.compile(r"([0-9]{1,20})(?: +(LAST))? *", re.IGNORECASE)


def chunk_received(size):
    return Reply(250, "2.0.0", "Ok: %d octets received" % (size,))


class ChunkScanner(DataScanner):
    """DataScanner's checks (bare CR/LF, line length, size) on octets that are not dot-stuffed."""

    unstuff = False

    def feed_chunk(self, data):
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\n") + 1
        if cut:
            self._take(buf[:cut])
            buf = buf[cut:]
        if len(buf) > 1000:
            self.line_too_long = True
            self._take(buf[:-1])
            buf = buf[-1:]
        self._tail = buf

    def finish(self):
        """After the LAST chunk: the unfinished last line counts too (a lone CR is bare)."""
        if self._tail:
            tail, self._tail = self._tail, b""
            self._take(tail)
            if tail.endswith(b"\r"):
                self.bare_newline = True


class Chunk:
    """The octets of one BDAT being read: into scanner, or thrown away when scanner is None."""

    def __init__(self, size, last, scanner, problem):
        self.left = size
        self.size = size
        self.last = last
        self.scanner = scanner
        self.problem = problem  # the Reply to give once the octets are read, or None

    def feed(self, data):
        """Take what belongs to the chunk; the rest of data (next commands), or None for more."""
        part, rest = data[:self.left], data[self.left:]
        self.left -= len(part)
        if self.scanner is not None and part:
            self.scanner.feed_chunk(part)
        return rest if self.left == 0 else None


def parse(arg):
    """(size, last) from BDAT's argument, or None when it is not 'size [LAST]'."""
    match = _BDAT_RE.fullmatch(arg)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) is not None


def start(server, arg):
    """
    BDAT: the Chunk to read (server._chunk), with the reply its end calls for.  Returns a reply
    to give at once only when the command cannot be framed (then the session closes).
    """
    parsed = parse(arg)
    if parsed is None:
        return BDAT_SYNTAX
    size, last = parsed
    problem = _problem(server, size)
    scanner = None
    if problem is None:
        if server.bdat is None:
            server.bdat = ChunkScanner(server.listener.max_message_size)
            server.bdat_declared = 0
        server.bdat_declared += size
        scanner = server.bdat
    server._chunk = Chunk(size, last, scanner, problem)
    return None


def _problem(server, size):
    """Why this chunk cannot be taken (checked before any of it is read), or None."""
    if server.listener.tls == "required" and not server.tls:
        return replies.TLS_FIRST
    if server.helo is None or not server.esmtp:
        return replies.BAD_SEQUENCE_HELO
    if server.sender is None:
        return replies.NEED_MAIL
    if not server.recipients:
        return replies.NO_RCPT
    if server.bdat_declared + size > server.listener.max_message_size:
        return replies.TOO_BIG
    return None


def finished(server, chunk):
    """The chunk's octets are read: its reply, or the end of the message (a Deferred)."""
    if chunk.problem is not None:
        server._error(chunk.problem)
        if chunk.problem is replies.TOO_BIG:
            server._reset_transaction()  # the transaction failed: no more chunks for it
        return None
    if not chunk.last:
        return server._reply(chunk_received(chunk.size))
    scanner = server.bdat
    scanner.finish()
    return server._end_of_data(scanner)
