"""
CHUNKING (RFC 3030) on the listener, with raw bytes: BDAT framing keeps the properties of the
DATA path (../shared/twisted-mail-notes.md S1-S7): chunk octets are never commands, sizes that
lie cannot smuggle, buffers stay bounded, pipelined commands are answered strictly in order.
"""

from twisted.internet import defer
from twisted.trial import unittest

from mailgate.config import Limits
from mailgate.smtp.chunking import ChunkScanner, parse
from tests.smtphelp import Session, listener

MESSAGE = b"Subject: chunked\r\n\r\n.a line starting with a dot\r\nend\r\n"


def session(**kw):
    s = Session(listener(**kw))
    s.read()
    s.cmd("EHLO client.example")
    return s


def transaction(s, sender="a@remote.example", rcpts=("u@example.com",)):
    assert s.cmd("MAIL FROM:<%s>" % sender).startswith("250 "), sender
    for rcpt in rcpts:
        assert s.cmd("RCPT TO:<%s>" % rcpt).startswith("250 "), rcpt


def bdat(data, last=True):
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def stored(s):
    """The bytes queued for each message, without our Received header."""
    return [_without_received(data) for _, data in s.queue.messages.values()]


def _without_received(data):
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


class BDATTests(unittest.TestCase):
    def test_advertised(self):
        s = Session(listener())
        s.read()
        self.assertIn("250-CHUNKING\r\n", s.cmd("EHLO client.example"))
        self.assertNotIn("BINARYMIME", s.cmd("EHLO client.example"))

    def test_one_chunk_is_stored_as_sent_without_unstuffing(self):
        s = session()
        transaction(s)
        s.send(bdat(MESSAGE))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(stored(s), [MESSAGE])

    def test_chunks_pipelined_with_the_whole_transaction(self):
        s = session()
        s.send(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<u@example.com>\r\n"
               b"RCPT TO:<v@example.com>\r\n" + bdat(MESSAGE[:10], last=False)
               + bdat(MESSAGE[10:], last=False) + b"BDAT 0 LAST\r\nQUIT\r\n")
        self.assertEqual(s.read(), "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                                   "250 2.0.0 Ok: 10 octets received\r\n"
                                   "250 2.0.0 Ok: %d octets received\r\n"
                                   "250 2.0.0 Ok: queued as Q0001\r\n221 2.0.0 Bye\r\n"
                         % (len(MESSAGE) - 10))
        self.assertEqual(stored(s), [MESSAGE])
        [(envelope, _)] = s.queue.messages.values()
        self.assertEqual(envelope.recipients, ("u@example.com", "v@example.com"))

    def test_byte_by_byte(self):
        s = session()
        transaction(s)
        for byte in bdat(MESSAGE):
            s.send(bytes([byte]))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(stored(s), [MESSAGE])

    def test_bdat_0_last_alone_is_an_empty_message(self):
        s = session()
        transaction(s)
        self.assertEqual(s.cmd("BDAT 0 LAST"), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(stored(s), [b""])

    def test_a_fake_end_of_data_and_commands_inside_a_chunk_are_content(self):
        s = session()
        transaction(s)
        inside = (b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@remote.example>\r\n"
                  b"RCPT TO:<victim@example.com>\r\nDATA\r\nSTARTTLS\r\nQUIT\r\n")
        s.send(bdat(inside))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(stored(s), [inside])
        self.assertIsNone(s.transport.tls_started)
        self.assertFalse(s.closed)
        self.assertEqual(len(s.queue.messages), 1)

    def test_a_size_that_lies_long_keeps_reading_commands_as_content(self):
        s = Session(listener(limits=Limits(data_timeout=60)))
        s.read()
        s.cmd("EHLO client.example")
        transaction(s)
        s.send(b"BDAT 100 LAST\r\nshort\r\nQUIT\r\n")
        self.assertEqual(s.read(), "")  # QUIT is octets 8 to 13 of the 100
        self.assertFalse(s.closed)
        s.clock.advance(60)
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: data timeout exceeded\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_a_size_that_lies_short_leaves_the_rest_as_the_next_command(self):
        s = session()
        transaction(s)
        s.send(b"BDAT 4 LAST\r\nhi\r\nNOOP\r\n")
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(stored(s), [b"hi\r\n"])

    def test_bdat_after_a_failed_mail_reads_and_drops_its_octets(self):
        s = session()
        self.assertTrue(s.cmd("MAIL FROM:<bad address>").startswith("501 "))
        chunk = b"RCPT TO:<u@example.com>\r\nDATA\r\n"
        s.send(bdat(chunk) + b"NOOP\r\n")
        self.assertEqual(s.read(), "503 5.5.1 Need MAIL command\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_bdat_without_recipients_and_before_ehlo(self):
        s = session()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.send(b"BDAT 4 LAST\r\nQUIT")
        self.assertEqual(s.read(), "554 5.5.1 No valid recipients\r\n")
        s = Session(listener())
        s.read()
        s.send(b"BDAT 4\r\nQUIT")
        self.assertEqual(s.read(), "503 5.5.1 Send EHLO/HELO first\r\n")
        s.cmd("HELO client.example")  # HELO is not EHLO: no extensions
        s.send(b"BDAT 4\r\nQUIT")
        self.assertEqual(s.read(), "503 5.5.1 Send EHLO/HELO first\r\n")
        self.assertFalse(s.closed)

    def test_tls_required(self):
        s = Session(listener(tls="required"))
        s.read()
        s.cmd("EHLO client.example")
        s.send(b"BDAT 4 LAST\r\nQUIT")
        self.assertEqual(s.read(), "530 5.7.0 Must issue a STARTTLS command first\r\n")
        self.assertFalse(s.closed)

    def test_sizes_are_checked_before_reading(self):
        s = session(max_message_size=100)
        transaction(s)
        s.send(bdat(b"x" * 60, last=False))
        self.assertEqual(s.read(), "250 2.0.0 Ok: 60 octets received\r\n")
        s.send(b"BDAT 50 LAST\r\n")
        self.assertEqual(s.read(), "")  # the 50 octets are still read, and dropped
        s.send(b"y" * 50)
        self.assertEqual(s.read(), "552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertIsNone(s.proto.bdat)  # nothing kept
        s.send(bdat(b"RSET\r\n"))  # the transaction is over: its later chunks are refused
        self.assertEqual(s.read(), "503 5.5.1 Need MAIL command\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_a_huge_announced_size_is_never_buffered(self):
        s = session(max_message_size=1000)
        transaction(s)
        s.send(b"BDAT 99999999999999999999 LAST\r\n")
        for _ in range(64):
            s.send(b"z" * 65536)
        self.assertEqual(s.read(), "")
        self.assertLess(len(s.proto._buffer), 65536)
        self.assertIsNone(s.proto.bdat)

    def test_data_after_bdat_is_refused(self):
        s = session()
        transaction(s)
        s.send(bdat(b"Subject: a\r\n", last=False))
        self.assertEqual(s.read(), "250 2.0.0 Ok: 12 octets received\r\n")
        self.assertEqual(s.cmd("DATA"),
                         "503 5.5.1 DATA cannot be mixed with BDAT in one transaction\r\n")
        s.send(bdat(b"\r\nbody\r\n"))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        # After DATA's message, BDAT starts a transaction of its own.
        transaction(s)
        self.assertTrue(s.cmd("DATA").startswith("354 "))
        s.send(b"Subject: b\r\n\r\nx\r\n.\r\n")
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0002\r\n")
        transaction(s)
        s.send(bdat(b"Subject: c\r\n\r\ny\r\n"))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0003\r\n")

    def test_rset_forgets_the_chunks(self):
        s = session()
        transaction(s)
        s.send(bdat(b"Subject: a\r\n", last=False))
        s.read()
        s.cmd("RSET")
        self.assertIsNone(s.proto.bdat)
        s.send(b"BDAT 1 LAST\r\nx")
        self.assertEqual(s.read(), "503 5.5.1 Need MAIL command\r\n")

    def test_bare_newlines_and_long_lines_are_refused_after_last(self):
        s = session()
        transaction(s)
        s.send(bdat(b"Subject: a\nbody\r\n"))
        self.assertEqual(s.read(), "550 5.6.0 Message contains bare CR or LF characters\r\n")
        transaction(s)
        s.send(bdat(b"Subject: a\r\n\r\n" + b"x" * 999 + b"\r\n"))
        self.assertEqual(s.read(), "554 5.6.0 Message contains a line longer than 998 "
                                   "characters\r\n")
        transaction(s)
        s.send(bdat(b"Subject: a\r\n\r\nends in a lone CR\r"))
        self.assertEqual(s.read(), "550 5.6.0 Message contains bare CR or LF characters\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_a_message_may_end_without_crlf(self):
        s = session()
        transaction(s)
        s.send(bdat(b"Subject: a\r\n\r\nno newline at the end"))
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(stored(s), [b"Subject: a\r\n\r\nno newline at the end"])

    def test_a_bare_newline_split_across_chunks(self):
        s = session()
        transaction(s)
        s.send(bdat(b"Subject: a\r", last=False) + bdat(b"x\r\n"))
        self.assertEqual(s.read(), "250 2.0.0 Ok: 11 octets received\r\n"
                                   "550 5.6.0 Message contains bare CR or LF characters\r\n")
        transaction(s)
        s.send(bdat(b"Subject: a\r", last=False) + bdat(b"\n\r\nbody\r\n"))
        self.assertEqual(s.read(), "250 2.0.0 Ok: 11 octets received\r\n"
                                   "250 2.0.0 Ok: queued as Q0001\r\n")

    def test_unframable_bdat_closes(self):
        for arg in ("BDAT", "BDAT x", "BDAT -1", "BDAT 10 NOTLAST", "BDAT 1" + "0" * 20):
            s = session()
            transaction(s)
            s.send(arg.encode() + b"\r\nMAIL FROM:<x@remote.example>\r\n")
            self.assertEqual(s.read(), "501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n", arg)
            self.assertTrue(s.closed, arg)

    def test_a_pending_check_holds_the_chunk_back_in_order(self):
        class Slow:
            def __init__(self):
                self.pending = []

            def on_rcpt(self, session, recipient):
                d = defer.Deferred()
                self.pending.append(d)
                return d

        hooks = Slow()
        s = Session(listener(), hooks=hooks)
        s.read()
        s.cmd("EHLO client.example")
        s.send(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<u@example.com>\r\n" + bdat(MESSAGE)
               + b"NOOP\r\n")
        self.assertEqual(s.read(), "250 2.1.0 Ok\r\n")
        hooks.pending.pop().callback(None)
        self.assertEqual(s.read(), "250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as Q0001\r\n"
                                   "250 2.0.0 Ok\r\n")

    def test_queue_failure_is_451(self):
        s = session()
        s.queue.fail = True
        transaction(s)
        s.send(bdat(MESSAGE))
        self.assertEqual(s.read(), "451 4.3.0 Temporary failure, please try again later\r\n")
        self.flushLoggedErrors()

    def test_the_250_waits_for_the_queue(self):
        s = session()
        s.queue.hold = True
        transaction(s)
        s.send(bdat(MESSAGE) + b"NOOP\r\n")
        self.assertEqual(s.read(), "")
        s.queue.release()
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n250 2.0.0 Ok\r\n")


class ChunkParsingTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parse("10"), (10, False))
        self.assertEqual(parse("0 last"), (0, True))
        self.assertEqual(parse("10  LAST"), (10, True))
        self.assertIsNone(parse("10 LAST x"))
        self.assertIsNone(parse("+10"))

    def test_scanner_does_not_unstuff(self):
        scanner = ChunkScanner(100)
        scanner.feed_chunk(b".x\r\n..y\r\n")
        scanner.finish()
        self.assertEqual(scanner.message(), b".x\r\n..y\r\n")
        self.assertFalse(scanner.bare_newline)
