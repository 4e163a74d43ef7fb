"""
The DATA phase, scanned in bulk.

Twisted's line receiver calls Python once per line and lets bare LF, bare CR and over-long lines
through (notes S1, S4, S5).  Here each received buffer is examined with a few bytes operations: the
end of data is only ever <CRLF>.<CRLF>; dot-stuffing is undone with one replace; bare CR/LF and
lines over 1000 octets are detected with counts and one split, and mark the message
for rejection after the final dot (never before: leaving DATA early is a smuggling path).
"""

_END = b"\r\n.\r\n"
MAX_LINE = 1000  # octets, CRLF included (RFC 5321 4.5.3.1.6)


class DataScanner:
    """
    Collects one message's bytes from DATA, unstuffed, until <CRLF>.<CRLF>.

    feed() takes raw bytes and returns the bytes that followed the end of data (the next pipelined
    commands) once the end is seen, else None.  Memory is bounded: beyond max_size nothing more is
    kept, only scanned.
    """

    unstuff = True  # DATA is dot-stuffed; BDAT chunks (mailgate.smtp.chunking) are not

    def __init__(self, max_size):
        self.max_size = max_size
        self.size = 0
        self.chunks = []
        self.bare_newline = False
        self.line_too_long = False
        self.too_big = False
        self._prev = b"\r\n"  # the two bytes before the unscanned part: DATA ended with CRLF
        self._tail = b""  # an incomplete line carried to the next feed

    def feed(self, data):
        buf = self._tail + data if self._tail else data
        context = self._prev + buf
        end = context.find(_END)
        if end >= 0:
            # context[2:end + 2] is the message up to and including the CRLF before the dot.
            self._take(context[2:end + 2])
            self._tail = b""
            return context[end + 5:]
        cut = buf.rfind(b"\n") + 1
        if cut:
            self._take(buf[:cut])
            buf = buf[cut:]
        if len(buf) > MAX_LINE:
            # A line longer than any legal one and still no newline: keep scanning it, but do not
            # hold it; its last byte stays behind in case it is the CR of a CRLF.
            self.line_too_long = True
            self._take(buf[:-1])
            buf = buf[-1:]
        self._tail = buf
        return None

    def _take(self, part):
        """Check and keep one run of bytes that starts where self._prev ends."""
        if not part:
            return
        n_crlf = part.count(b"\r\n")
        if part.count(b"\n") != n_crlf or part.count(b"\r") != n_crlf:
            # Runs end at a LF, or (an over-long line) keep their last byte back, so a CRLF is
            # never split between two runs: any CR or LF not paired here is bare.
            self.bare_newline = True
        # A text line is at most 998 octets before its CRLF: split pieces hold line + CR, so 999.
        # (One split per received run costs ~1-4 ms/MB; a regex search per byte was 100x slower.)
        if len(part) > 999 and max(map(len, part.split(b"\n"))) > 999:
            self.line_too_long = True
        # Only CRLF starts a line, as in the replace below (a dot after a bare LF is kept,
        # whichever chunk it arrives in: found by tests/smtp/test_properties.py).
        at_line_start = self._prev == b"\r\n"
        self._prev = (self._prev + part[-2:])[-2:]
        if not self.unstuff:
            return self._keep(part)
        if at_line_start and part[:1] == b".":
            part = part[1:]
        self._keep(part.replace(b"\r\n.", b"\r\n"))

    def _keep(self, part):
        if self.too_big:
            return
        self.size += len(part)
        if self.size > self.max_size:
            self.too_big = True
            self.chunks = []
            return
        self.chunks.append(part)

    def message(self):
        return b"".join(self.chunks)
