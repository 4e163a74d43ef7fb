"""
The Authentication-Results field (RFC 8601): building ours, and removing forged ones byte for byte.
"""

import email
import email.policy

from twisted.trial import unittest

from mailgate.filters import authresults
from mailgate.filters.authresults import field_authserv_id, fold, header, strip_forged
from mailgate.verdict import AuthResult

SPF = AuthResult("spf", "pass", properties=[("smtp.mailfrom", "example.org")])
DKIM = AuthResult("dkim", "pass", properties=[("header.d", "example.org"), ("header.s", "sel1")])
DMARC = AuthResult("dmarc", "fail", reason="p=reject", properties=[("header.from", "example.org")])


def lines_of(data):
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


class HeaderTests(unittest.TestCase):
    def test_no_results(self):
        self.assertEqual(header("mx.example.net", []),
                         b"Authentication-Results: mx.example.net; none\r\n")

    def test_one_result_a_line(self):
        self.assertEqual(
            header("mx.example.net", [SPF, DKIM, DMARC]),
            b"Authentication-Results: mx.example.net;\r\n"
            b"\tspf=pass smtp.mailfrom=example.org;\r\n"
            b"\tdkim=pass header.d=example.org header.s=sel1;\r\n"
            b'\tdmarc=fail reason="p=reject" header.from=example.org\r\n')

    def test_values_that_are_not_tokens_are_quoted(self):
        result = AuthResult("spf", "fail", properties=[
            ("smtp.mailfrom", "user@example.org"), ("smtp.helo", "two words"),
            ("policy.x", 'a"b\\c'), ("policy.empty", "")])
        self.assertEqual(
            header("mx.example.net", [result]),
            b"Authentication-Results: mx.example.net;\r\n"
            b'\tspf=fail smtp.mailfrom="user@example.org" smtp.helo="two words"\r\n'
            b' policy.x="a\\"b\\\\c" policy.empty=""\r\n')

    def test_reason_is_always_quoted_and_escaped(self):
        result = AuthResult("dkim", "fail", reason='signature "did not" verify')
        self.assertEqual(header("mx.example.net", [result]),
                         b"Authentication-Results: mx.example.net;\r\n"
                         b'\tdkim=fail reason="signature \\"did not\\" verify"\r\n')

    def test_long_results_are_folded_at_spaces(self):
        result = AuthResult("dkim", "pass", reason="a good signature " * 4, properties=[
            ("header.d", "a-rather-long-subdomain.of-an-organisation.example.org"),
            ("header.i", "@a-rather-long-subdomain.of-an-organisation.example.org"),
            ("header.s", "selector2026"), ("header.b", "AbCdEfGh")])
        data = header("mx.example.net", [SPF, result])
        for line in lines_of(data):
            self.assertLessEqual(len(line), 78, line)
        for line in lines_of(data)[1:]:
            self.assertIn(line[:1], (b" ", b"\t"))
        # Unfolding (removing each CRLF) gives back the single-line result: no space turned
        # into a tab inside the quoted reason.
        unfolded = data[:-2].replace(b"\r\n", b"")
        self.assertIn(b'dkim=pass reason="a good signature a good signature a good signature a '
                      b'good signature" header.d=a-rather-long-subdomain.of-an-organisation'
                      b'.example.org header.i="@a-rather-long-subdomain.of-an-organisation'
                      b'.example.org" header.s=selector2026 header.b=AbCdEfGh', unfolded)

    def test_a_word_longer_than_a_line_stays_whole(self):
        result = AuthResult("dkim", "pass", properties=[("header.b", "x" * 100)])
        data = header("mx.example.net", [result])
        self.assertIn(b"\r\n header.b=" + b"x" * 100 + b"\r\n", data)

    def test_injection_attempts_are_neutralised(self):
        evil = [
            AuthResult("spf\r\nX-Injected: 1", "pass\r\n\r\nbody", reason="ok\r\nX-Injected: 2",
                       properties=[("smtp.mailfrom\r\nX-Injected", "example.org\r\nX-Injected: 3"),
                                   ("header.d", "a\nb\rc\x00d\x1be\x7ff\x85g\u2028h")]),
        ]
        data = header("mx.example.net\r\nX-Injected: 4", evil)
        for line in lines_of(data)[1:]:
            self.assertIn(line[:1], (b" ", b"\t"), line)
        self.assertEqual(data.count(b"\r"), data.count(b"\r\n"))
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertFalse(any(b < 32 and b not in (9, 10, 13) or b == 127 for b in data))
        parsed = email.message_from_bytes(data + b"\r\nbody\r\n", policy=email.policy.default)
        self.assertEqual(list(parsed.keys()), ["Authentication-Results"])
        self.assertEqual(
            data,
            b'Authentication-Results: "mx.example.netX-Injected: 4";\r\n'
            b'\tspfX-Injected1=passbody reason="okX-Injected: 2"\r\n'
            b' smtp.mailfromX-Injected="example.orgX-Injected: 3" header.d=abcdefgh\r\n')

    def test_methods_and_results_keep_only_keyword_characters(self):
        data = header("mx.example.net", [AuthResult("dkim/1", "pass;x=y", properties=[("header d", "v")])])
        self.assertEqual(data, b"Authentication-Results: mx.example.net;\r\n"
                               b"\tdkim/1=passxy headerd=v\r\n")

    def test_a_result_without_method_or_result_is_left_out(self):
        self.assertEqual(header("mx.example.net", [AuthResult("\r\n", "pass"), AuthResult("spf", "")]),
                         b"Authentication-Results: mx.example.net; none\r\n")
        self.assertEqual(header("mx.example.net", [AuthResult(";", "pass"), SPF]),
                         b"Authentication-Results: mx.example.net;\r\n"
                         b"\tspf=pass smtp.mailfrom=example.org\r\n")

    def test_utf8_values_are_quoted(self):
        result = AuthResult("spf", "pass", properties=[("smtp.mailfrom", "j\u00f6rg@b\u00fccher.example")])
        self.assertIn('smtp.mailfrom="j\u00f6rg@b\u00fccher.example"'.encode("utf-8"),
                      header("mx.example.net", [result]))

    def test_sanitize(self):
        self.assertEqual(authresults.sanitize(" a\tb\r\n  c\x00\x7fd "), "a b cd")

    def test_fold_keeps_short_lines(self):
        self.assertEqual(fold("X: short"), "X: short")
        self.assertEqual(fold("X: " + "a " * 50 + "b", limit=20).replace("\r\n", ""), "X: " + "a " * 50 + "b")


FORGED = (
    b"Received: from a.example (a.example [192.0.2.1])\r\n"
    b"\tby b.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=evil.example\r\n"
    b"Authentication-Results: other.example;\r\n"
    b"\tdkim=pass header.d=example.org\r\n"
    b"From: a@example.org\r\n"
    b"authentication-results:\r\n"
    b"  (a comment (nested) \\) here)\r\n"
    b"\tMX.Example.NET 1;\r\n"
    b"\tdkim=pass header.d=paypal.example;\r\n"
    b"\tdmarc=pass header.from=paypal.example\r\n"
    b"Authentication-Results : \"mx.example.net\"; dmarc=pass\r\n"
    b"Authentication-Results: mx.example.net.; none\r\n"
    b"Authentication-Results: mx.example.net.evil.example; spf=pass\r\n"
    b"Authentication-Results: mx.example.networks; spf=pass\r\n"
    b"X-Authentication-Results: mx.example.net; spf=pass\r\n"
    b"Subject: test\r\n"
    b"Authentication-Results: mx.example.net;spf=fail\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.net; this is the body\r\n"
    b"\r\n"
    b"and more body\r\n"
)

STRIPPED = (
    b"Received: from a.example (a.example [192.0.2.1])\r\n"
    b"\tby b.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: other.example;\r\n"
    b"\tdkim=pass header.d=example.org\r\n"
    b"From: a@example.org\r\n"
    b"Authentication-Results: mx.example.net.evil.example; spf=pass\r\n"
    b"Authentication-Results: mx.example.networks; spf=pass\r\n"
    b"X-Authentication-Results: mx.example.net; spf=pass\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.net; this is the body\r\n"
    b"\r\n"
    b"and more body\r\n"
)


class StripForgedTests(unittest.TestCase):
    def test_removes_ours_keeps_the_rest_byte_for_byte(self):
        self.assertEqual(strip_forged(FORGED, "mx.example.net"), STRIPPED)

    def test_compares_without_case(self):
        self.assertEqual(strip_forged(FORGED, "MX.EXAMPLE.NET"), STRIPPED)

    def test_nothing_to_remove(self):
        self.assertIs(strip_forged(STRIPPED, "mx.example.net"), STRIPPED)
        self.assertEqual(strip_forged(FORGED, "elsewhere.example"), FORGED)

    def test_other_authserv_id(self):
        self.assertEqual(
            strip_forged(FORGED, "other.example"),
            FORGED.replace(b"Authentication-Results: other.example;\r\n\tdkim=pass header.d=example.org\r\n", b""))

    def test_headers_only_message(self):
        raw = b"Subject: x\r\nAuthentication-Results: mx.example.net; none\r\n"
        self.assertEqual(strip_forged(raw, "mx.example.net"), b"Subject: x\r\n")
        raw = b"Subject: x\r\nAuthentication-Results: mx.example.net; none"
        self.assertEqual(strip_forged(raw, "mx.example.net"), b"Subject: x\r\n")

    def test_first_and_last_fields(self):
        raw = (b"Authentication-Results: mx.example.net; none\r\nSubject: x\r\n"
               b"Authentication-Results: mx.example.net; spf=pass\r\n\tsmtp.mailfrom=x\r\n\r\nbody")
        self.assertEqual(strip_forged(raw, "mx.example.net"), b"Subject: x\r\n\r\nbody")

    def test_empty_header_block(self):
        raw = b"\r\nAuthentication-Results: mx.example.net; none\r\n"
        self.assertIs(strip_forged(raw, "mx.example.net"), raw)
        self.assertEqual(strip_forged(b"", "mx.example.net"), b"")

    def test_authserv_id_of_a_field(self):
        self.assertEqual(field_authserv_id(b"Authentication-Results: Mx.Example.Net; none"), "mx.example.net")
        self.assertEqual(field_authserv_id(b"Authentication-Results: (c) mx.example.net 1 ; none"),
                         "mx.example.net")
        self.assertEqual(field_authserv_id(b'Authentication-Results: "mx.ex\\ample.net"; x'), "mx.example.net")
        self.assertEqual(field_authserv_id(b"Authentication-Results:\r\n\tmx.example.net;"), "mx.example.net")
        self.assertIsNone(field_authserv_id(b"Authentication-Results: ; spf=pass"))
        self.assertIsNone(field_authserv_id(b"Authentication-Results: (unterminated"))
        self.assertIsNone(field_authserv_id(b"no colon"))


def test_incoming_mailgate_dmarc_tag_is_removed_as_a_forgery():
    raw = (b"X-Mailgate-DMARC: pass\r\nSubject: hi\r\nx-mailgate-dmarc:\r\n  none\r\n"
           b"X-Mailgate-DMARCish: kept\r\n\r\nX-Mailgate-DMARC: body text stays\r\n")
    assert strip_forged(raw, "mx.example.net") == (
        b"Subject: hi\r\nX-Mailgate-DMARCish: kept\r\n\r\nX-Mailgate-DMARC: body text stays\r\n")
