"""
What bench/run sends: the cells (size, sessions, recipients, one message per connection or many),
the loopback DNS zone with SPF, DKIM and DMARC records for the sender's domain, and the one
DKIM-signed message of each size that every target gets.
"""

import base64
import hashlib
import os
import re
import sys
from collections import namedtuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENDER_DOMAIN = "sender.test"
SENDER = "bench@" + SENDER_DOMAIN
HELO = "client." + SENDER_DOMAIN
RCPT_DOMAIN = "example.test"
RCPT = "user@" + RCPT_DOMAIN
SELECTOR = "bench"
SPF_RECORD = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC_RECORD = "v=DMARC1; p=reject"

SIZES = {"4k": 4 * 1024, "100k": 100 * 1024}


class Cell(namedtuple("Cell", "size sessions rcpts reuse")):
    """size: a key of SIZES; sessions; recipients per message; reuse: smtp-source -d."""

    @property
    def name(self):
        return "%s/%d/%d%s" % (self.size, self.sessions, self.rcpts, "/d" if self.reuse else "")

    @property
    def label(self):
        return "%s s%d r%d%s" % (self.size.upper(), self.sessions, self.rcpts,
                                 " -d" if self.reuse else "")

    @property
    def nbytes(self):
        return SIZES[self.size]


CELL_RE = re.compile(r"^(4k|100k)/(\d+)/(\d+)(/d)?$")


def parse_cell(text):
    match = CELL_RE.match(text.strip().lower())
    if not match:
        raise ValueError("a cell is SIZE/SESSIONS/RECIPIENTS[/d] with SIZE 4k or 100k, "
                         "e.g. 4k/20/1 or 100k/20/1/d; got %r" % (text,))
    size, sessions, rcpts, reuse = match.groups()
    if int(sessions) < 1 or int(rcpts) < 1:
        raise ValueError("sessions and recipients must be at least 1: %r" % (text,))
    return Cell(size, int(sessions), int(rcpts), bool(reuse))


FULL_CELLS = [Cell(size, sessions, rcpts, False)
              for size in ("4k", "100k") for sessions in (1, 20, 100) for rcpts in (1, 10)]
FULL_CELLS += [Cell("4k", 1, 1, True), Cell("4k", 20, 1, True), Cell("100k", 20, 1, True)]
QUICK_CELLS = [Cell("4k", 1, 1, False), Cell("4k", 20, 1, False), Cell("4k", 100, 10, False),
               Cell("100k", 20, 1, False), Cell("4k", 20, 1, True)]


def messages_for(cell, quick=False, scale=1.0):
    """How many messages smtp-source sends in one run of the cell."""
    # sized so that the slowest target (mailgate-filters, end to end) takes a few seconds a run
    # and the full run stays under about 20 minutes on 2 cores
    count = 150 if cell.sessions < 20 else 300 if cell.sessions < 100 else 500
    if cell.size == "100k":
        count //= 2
    if quick:
        count //= 3
    return max(cell.sessions, 20, int(count * scale))


def latency_messages_for(cell, quick=False, scale=1.0):
    """How many messages our own client sends in the latency phase of one run."""
    count = 50 if quick else 100
    return max(cell.sessions * 2, 20, int(count * scale))


# --- DNS and DKIM -------------------------------------------------------------------------------


def dkim_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def start_zone(key):
    """The loopback DNS server (tests/dnsserver.py) with the sender domain's records; running."""
    sys.path.insert(0, REPO)
    from tests.dkimkeys import key_record
    from tests.dnsserver import TestDNS

    zone = TestDNS()
    for name in (SENDER_DOMAIN, HELO):
        zone.add(name, "A", "127.0.0.1")
        zone.add(name, "TXT", SPF_RECORD)
    zone.add("%s._domainkey.%s" % (SELECTOR, SENDER_DOMAIN), "TXT", key_record(key))
    zone.add("_dmarc." + SENDER_DOMAIN, "TXT", DMARC_RECORD)
    zone.start_thread()
    return zone


def _filler(nbytes):
    """nbytes of deterministic, incompressible-looking data, as a PDF would be."""
    out, block = [b"%PDF-1.4\n"], b"mailgate bench"
    while sum(map(len, out)) < nbytes:
        block = hashlib.sha256(block).digest()
        out.append(block)
    return b"".join(out)[:nbytes]


def _unsigned(attachment_bytes, number=0):
    body = base64.encodebytes(_filler(attachment_bytes)).replace(b"\n", b"\r\n")
    text = ("Hello,\r\n\r\nthe report is attached.  This message is the same for every target of "
            "the benchmark.\r\n\r\n-- \r\nbench\r\n").encode()
    headers = [
        "From: Bench <%s>" % SENDER,
        "To: <%s>" % RCPT,
        "Subject: benchmark report",
        "Date: Wed, 02 Dec 2026 12:00:00 +0000",
        "Message-ID: <bench-%d@%s>" % (number, SENDER_DOMAIN),
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="=-bench-boundary"',
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + b"".join([
        b"--=-bench-boundary\r\n",
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n", text,
        b"--=-bench-boundary\r\n",
        b'Content-Type: application/pdf; name="report.pdf"\r\n',
        b'Content-Disposition: attachment; filename="report.pdf"\r\n',
        b"Content-Transfer-Encoding: base64\r\n\r\n", body,
        b"--=-bench-boundary--\r\n",
    ])


def signed_message(nbytes, key):
    """A DKIM-signed (rsa-sha256, d=sender.test) multipart message of about nbytes, CRLF."""
    import dkim

    sys.path.insert(0, REPO)
    from tests.dkimkeys import private

    attachment = max(64, nbytes * 3 // 4 - 1200)
    for _ in range(6):  # base64 and the signature add a roughly known amount: converge on nbytes
        message = _unsigned(attachment)
        signature = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), private(key),
                              include_headers=[b"from", b"to", b"subject", b"date",
                                               b"message-id", b"mime-version", b"content-type"],
                              canonicalize=(b"relaxed", b"relaxed"), linesep=b"\r\n")
        signed = signature + message
        missing = nbytes - len(signed)
        if abs(missing) < 80:
            break
        attachment = max(64, attachment + missing * 3 // 4)
    return signed


def write_for_smtp_source(message, path):
    """smtp-source -F sends each line of the file with CRLF appended (and dot-stuffs): LF lines."""
    with open(path, "wb") as f:
        f.write(message.replace(b"\r\n", b"\n"))
    return path
