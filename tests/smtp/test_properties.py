"""
Property-based tests (hypothesis) of the parsers that face the internet: the address parser,
the command line and session loop, DataScanner, and the config parser.  No input may make an
exception escape, and every answer is a valid SMTP reply line.  The number of examples is bounded
(the profile below) so that CI stays quick; HYPOTHESIS_PROFILE=thorough runs many more.
"""

import os
import re

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from mailgate.config import load_config
from mailgate.envelope import Address, Reply
from mailgate.errors import ConfigError, ReplyError
from mailgate.smtp import address
from mailgate.smtp.datascan import DataScanner

from tests.smtphelp import Session, listener

settings.register_profile("ci", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPLY_LINE = re.compile(rb"\A[2-5][0-9]{2}([ -])[\x20-\x7e]*\Z")
ENHANCED = re.compile(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")

# Bytes that matter to SMTP, mixed with anything at all.
SMTP_BYTES = st.sampled_from([b"<", b">", b"@", b":", b",", b"\"", b"\\", b"%", b"!", b"[", b"]",
                              b".", b" ", b"\t", b"\r", b"\n", b"\r\n", b"=", b"\x00", b"\xff",
                              b"a", b"Z", b"0", b"-", b"example.com", b"postmaster", b"SIZE=",
                              b"BODY=8BITMIME", b"IPv6:", b"::1", b"127.0.0.1"])
WEIRD = st.lists(st.one_of(SMTP_BYTES, st.binary(max_size=8)), max_size=30).map(b"".join)


def valid_reply(reply):
    assert isinstance(reply, Reply), reply
    assert 200 <= reply.code <= 599
    assert reply.status == "" or ENHANCED.match(reply.status), reply
    for line in reply.lines():
        assert REPLY_LINE.match(line), line


class AddressParserProperties(unittest.TestCase):
    @given(WEIRD)
    def test_mail_and_rcpt_either_parse_or_refuse_with_a_reply(self, raw):
        arg = raw.decode("latin-1")
        for parse in (address.parse_mail, address.parse_rcpt):
            try:
                parsed, params = parse(arg)
            except ReplyError as e:
                valid_reply(e.reply)
                self.assertGreaterEqual(e.reply.code, 500)
                continue
            self.assertIsInstance(parsed, Address)
            self.assertIsInstance(params, dict)
            text = str(parsed)
            # What is accepted never carries a line break or control characters onward.
            self.assertFalse(any(ord(c) < 32 or ord(c) == 127 for c in text), text)

    @given(WEIRD)
    def test_helo(self, raw):
        try:
            helo = address.parse_helo(raw.decode("latin-1"))
        except ReplyError as e:
            valid_reply(e.reply)
            return
        self.assertFalse(any(ord(c) < 32 or ord(c) == 127 for c in helo), helo)

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
    def test_unicode_text(self, text):
        for parse in (address.parse_mail, address.parse_rcpt):
            try:
                parse(text)
            except ReplyError as e:
                valid_reply(e.reply)


COMMANDS = st.sampled_from([b"EHLO client.example", b"HELO x", b"MAIL FROM:<a@remote.example>",
                            b"MAIL FROM:<>", b"RCPT TO:<u@example.com>", b"RCPT TO:<x@else.example>",
                            b"DATA", b"RSET", b"NOOP", b"VRFY x", b"EXPN x", b"HELP", b"STARTTLS",
                            b"AUTH PLAIN", b"AUTH LOGIN", b"*", b"QUIT", b".", b"", b"BDAT 1"])
LINE = st.one_of(COMMANDS, WEIRD, st.tuples(COMMANDS, WEIRD).map(lambda t: t[0] + b" " + t[1]))


class SessionProperties(unittest.TestCase):
    @given(st.lists(LINE, max_size=25), st.lists(st.integers(1, 64), min_size=1, max_size=10))
    def test_any_lines_in_any_chunks_get_only_valid_replies(self, lines, cuts):
        s = Session(listener(tls="optional", auth="optional"))
        data = b"".join(line + b"\r\n" for line in lines)
        pos, i = 0, 0
        while pos < len(data) and not s.closed:
            step = cuts[i % len(cuts)]
            s.send(data[pos:pos + step])
            pos, i = pos + step, i + 1
        s.clock.advance(3600)  # every timer fires: timeouts, delays
        out = s.transport.value()
        for line in out.split(b"\r\n")[:-1]:
            self.assertTrue(REPLY_LINE.match(line), line)
        self.assertTrue(out == b"" or out.endswith(b"\r\n"))
        self.assertEqual(self.flushLoggedErrors(), [])


# --- DataScanner ---------------------------------------------------------------------------------

BODY_LINE = st.lists(st.sampled_from([b"a", b".", b"..", b" ", b"\r", b"\n", b"x" * 50, b"\x00",
                                      b"\xe9", b"From: x", b"\t"]), max_size=12).map(b"".join)


def stuff(lines):
    """The wire form of a message (lines without their CRLF): dot-stuffed, with the final dot."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def chunked(data, cuts):
    out, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out.append(data[pos:pos + step])
        pos, i = pos + step, i + 1
    return out


def scan(chunks, max_size=1 << 20):
    scanner = DataScanner(max_size)
    rest = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk
            continue
        rest = scanner.feed(chunk)
    return scanner, rest


class DataScannerProperties(unittest.TestCase):
    @given(st.lists(BODY_LINE, max_size=15), st.binary(max_size=20),
           st.lists(st.integers(1, 40), min_size=1, max_size=8))
    def test_end_of_data_unstuffing_and_chunking(self, lines, after, cuts):
        wire = stuff(lines)
        has_bare = re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is not None
        if any(b"\r" in line or b"\n" in line for line in lines):
            # A bare CR/LF may form a CRLF.CRLF of its own: only check the flags and invariance.
            whole, whole_rest = scan([wire + after])
            parts, parts_rest = scan(chunked(wire + after, cuts))
            self.assertEqual((whole.message(), whole_rest, whole.bare_newline, whole.too_big),
                             (parts.message(), parts_rest, parts.bare_newline, parts.too_big))
            if whole_rest == after:  # the data ended at our final dot
                self.assertEqual(whole.bare_newline, has_bare)
            return
        scanner, rest = scan(chunked(wire + after, cuts))
        self.assertEqual(rest, after)  # the end of data is exactly the final dot line
        self.assertEqual(scanner.message(), b"".join(line + b"\r\n" for line in lines))
        self.assertFalse(scanner.bare_newline)
        self.assertEqual(scanner.line_too_long, any(len(line) > 998 for line in lines))

    @given(st.binary(max_size=300), st.integers(0, 300), st.sampled_from([b"\r", b"\n"]),
           st.lists(st.integers(1, 50), min_size=1, max_size=6))
    def test_bare_cr_or_lf_anywhere_is_found(self, text, at, bare, cuts):
        text = text.replace(b"\r", b"").replace(b"\n", b"")
        at = min(at, len(text))
        line = text[:at] + bare + text[at:]
        if bare == b"\r" and line.endswith(b"\r"):
            line += b"x"  # "\r" then our CRLF would make CR CR LF: still bare, keep it simple
        wire = stuff([line])
        scanner, rest = scan(chunked(wire, cuts))
        self.assertTrue(scanner.bare_newline, line)
        if rest is None:  # the bare LF before ".\r\n" cannot end data: it is still going on
            self.assertIsNone(scanner.feed(b"more\r\n"))
            rest = scanner.feed(b".\r\n")
            self.assertEqual(rest, b"")
            self.assertTrue(scanner.bare_newline)

    @given(st.binary(max_size=400), st.lists(st.integers(1, 60), min_size=1, max_size=8))
    def test_any_chunking_of_the_same_bytes_gives_the_same_result(self, data, cuts):
        data = data + b"\r\n.\r\nNEXT"
        whole, whole_rest = scan([data])
        parts, parts_rest = scan(chunked(data, cuts))
        self.assertEqual((whole.message(), whole_rest, whole.bare_newline, whole.line_too_long),
                         (parts.message(), parts_rest, parts.bare_newline, parts.line_too_long))
        self.assertIsNotNone(whole_rest)
        self.assertTrue(whole_rest.endswith(b"NEXT"))


# --- config -----------------------------------------------------------------------------------

SECTION = st.sampled_from(["gateway", "limits", "queue", "tls", "auth", "listener:mx", "dns",
                           "delivery", "route:r", "dkim", "filters", "spf", "dmarc",
                           "attachments", "logging", "metrics", "alerts", "admin", "DEFAULT",
                           "listener:", "nope"])
KEY = st.sampled_from(["hostname", "endpoint", "role", "tls", "auth", "max_connections",
                       "connection_rate_per_ip", "limit_exempt_ips", "greet_delay", "retry",
                       "domains", "smarthost", "path", "timeout", "relay_ips", "user", "x"])
VALUE = st.one_of(st.sampled_from(["tcp:25", "relay", "none", "60/1m", "0/1m", "1/0s", "relay_ips",
                                   "10.0.0.1/8", "::1", "5m", "-1", "yes", "*", "%", "a" * 300,
                                   "", "mx.example.com", "tcp:99999", "ssl:465"]),
                  st.text(max_size=20))


def _ini(sections):
    lines = []
    for name, pairs in sections:
        lines.append("[%s]" % name)
        lines.extend("%s = %s" % (k, v.replace("\n", " ")) for k, v in pairs)
    return "\n".join(lines) + "\n"


class ConfigProperties(unittest.TestCase):
    @settings(max_examples=100)
    @given(st.lists(st.tuples(SECTION, st.lists(st.tuples(KEY, VALUE), max_size=5)), max_size=6),
           st.binary(max_size=30))
    def test_any_file_loads_or_is_one_config_error_line(self, sections, junk):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "mailgate.ini")
        with open(path, "wb") as f:
            f.write(_ini(sections).encode("utf-8", "replace") + junk)
        try:
            load_config(path)
        except ConfigError as e:
            message = str(e)
            self.assertTrue(message.startswith(path), message)
            self.assertNotIn("\n", message)
