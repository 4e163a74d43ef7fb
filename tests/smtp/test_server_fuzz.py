"""
No input crashes the listener: seeded random sessions of real and broken commands, split at random
places, must only ever produce well-formed replies and never an unhandled error.
"""

import random
import re

from twisted.trial import unittest

from mailgate.config import Limits

from tests.smtphelp import Session, listener

REPLY_LINE = re.compile(rb"\A[2-5][0-9]{2}[ -][\x20-\x7e]*\Z")

PIECES = [
    b"EHLO client.example\r\n", b"HELO x\r\n", b"MAIL FROM:<a@remote.example>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n", b"RCPT TO:<u@example.com>\r\n",
    b"RCPT TO:<v@elsewhere.example>\r\n", b"RCPT TO:<@a,@b:u@example.com>\r\n", b"DATA\r\n",
    b"Subject: x\r\n\r\nbody\r\n.\r\n", b"..dot\r\n", b".\r\n", b"RSET\r\n", b"NOOP\r\n",
    b"VRFY x\r\n", b"EXPN x\r\n", b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"AUTH LOGIN dXNlcg==\r\n", b"AUTH CRAM-MD5\r\n", b"*\r\n", b"AGFsaWNlAHNlY3JldA==\r\n",
    b"MAIL FROM:<\"quoted@x\"@y.example>\r\n", b"RCPT TO:<postmaster>\r\n", b"BDAT 10\r\n",
    b"\r\n", b"\n", b"\r", b"\x00\x01\x7f\xff", b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n",
    b"EHLO " + b"x" * 600 + b"\r\n", b"RCPT TO:<" + b"a" * 300 + b"@example.com>\r\n",
    b"x" * 3000, b"\r\n.\r\n", b"QUIT\r\n", b"ehlo \xc3\xa9t\xc3\xa9.example\r\n",
]


INTO_DATA = (b"EHLO c.example\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<u@example.com>\r\n"
             b"DATA\r\n")


def session_bytes(rng):
    # Half the sessions get into DATA first, so that random bytes meet the DATA scanner too.
    prefix = INTO_DATA if rng.random() < 0.5 else b""
    return prefix + b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))


def feed(session, data, rng):
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 200)
        session.send(data[pos:pos + step])
        pos += step


class FuzzTests(unittest.TestCase):
    def check(self, seed, **kw):
        rng = random.Random(seed)
        s = Session(listener(limits=Limits(max_errors=1000), **kw))
        feed(s, session_bytes(rng), rng)
        s.clock.advance(rng.choice([0, 1, 400, 4000]))
        out = s.transport.value()
        lines = out.split(b"\r\n")
        self.assertEqual(lines[-1], b"", "replies end with CRLF (seed %d)" % seed)
        for line in lines[:-1]:
            self.assertRegex(line, REPLY_LINE, "seed %d" % seed)
        self.assertEqual(self.flushLoggedErrors(), [], "seed %d" % seed)
        return len(lines) - 1

    def test_relay_sessions(self):
        replies = sum(self.check(seed) for seed in range(300))
        self.assertGreater(replies, 3000)  # the sessions really talk, not just close at once

    def test_submission_sessions(self):
        replies = sum(self.check(seed, role="submission", tls="required", auth="required")
                      for seed in range(300, 500))
        self.assertGreater(replies, 2000)

    def test_implicit_tls_sessions(self):
        replies = sum(self.check(seed, role="submission", tls="implicit", auth="optional")
                      for seed in range(500, 600))
        self.assertGreater(replies, 1000)
