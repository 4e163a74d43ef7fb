"""
MIME and attachment fuzzing (hypothesis): nested multiparts, broken and missing boundaries, bad
transfer encodings and charsets, truncated and corrupted archives, all through the attachment
filter as the chain runs it.  Every message must get a verdict (pass, reject, quarantine,
strip): an exception is a crash, and each crash found becomes a regression test below.  Bounded
(80 examples a test; HYPOTHESIS_PROFILE=thorough for many more, see tests/smtp/test_properties.py).
"""

import base64
import os
import quopri

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from mailgate.config import AttachmentsConfig
from mailgate.envelope import Reply
from mailgate.filters import attachments

from tests import attachment_corpus as corpus
from tests.syncrun import Runner, result_of

EXAMPLES = 2000 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 80
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ACTIONS = ("next", "reject", "quarantine", "accept", "tempfail")

PAYLOADS = st.sampled_from([
    b"hello", b"", corpus.pe(), corpus.elf(), corpus.shebang(), corpus.pdf(), corpus.png(),
    corpus.zip_of([("a.txt", b"x"), ("b.exe", corpus.pe())]), corpus.tar_of([("x.sh", b"#!/bin/sh\n")]),
    corpus.gzip_of(b"data" * 100, "d.txt"), corpus.bzip2_of(b"b" * 1000), corpus.xz_of(b"x" * 500),
    corpus.nested_zip(3), corpus.encrypted_zip([("s.exe", corpus.pe())]), corpus.docm(),
    corpus.ole_vba(), corpus.jar(),
])


@st.composite
def damaged(draw, data):
    """data, maybe truncated, with bytes flipped, or with junk spliced in."""
    how = draw(st.sampled_from(["as is", "truncate", "flip", "splice"]))
    if how == "truncate" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=40)) + data[at:]
    return data


NAMES = st.sampled_from(["report.pdf", "invoice.exe", "a.zip", "x.tar.gz", "archive.7z", "doc.docm",
                         "=?utf-8?b?ZXZpbC5leGU=?=", "na\u00efve.txt", "", "..", "a" * 300,
                         "winmail.dat", "photo.png", "script.js", "x.ZIP", "evil.exe.txt"])
CTE = st.sampled_from(["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uuencode",
                       "bogus", ""])
CTYPE = st.sampled_from(["application/octet-stream", "application/zip", "text/plain",
                         "text/html; charset=utf-8", "text/plain; charset=x-unknown",
                         "application/pdf", "image/png", "application/ms-tnef", "message/rfc822",
                         "application/x-msdownload", "multipart/mixed", "bogus", ""])


def encode(data, cte, broken):
    if cte == "base64":
        text = base64.encodebytes(data)
        return text[:-7] + b"!!*" if broken and len(text) > 8 else text
    if cte == "quoted-printable":
        text = quopri.encodestring(data)
        return text + b"=Z" if broken else text
    return data


@st.composite
def leaf(draw):
    data = draw(damaged(draw(PAYLOADS)))
    cte = draw(CTE)
    headers = [b"Content-Type: " + draw(CTYPE).encode()]
    name = draw(NAMES)
    if name:
        headers.append(b'Content-Disposition: attachment; filename="' + name.encode("utf-8") + b'"')
    if cte:
        headers.append(b"Content-Transfer-Encoding: " + cte.encode())
    body = encode(data, cte, draw(st.booleans()))
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


@st.composite
def multipart(draw, depth=0):
    boundary = draw(st.sampled_from([b"b1", b"==b2==", b"x" * 80, b"", b"b 3", b"\xff"]))
    announced = draw(st.sampled_from(["same", "other", "missing", "quoted"]))
    ctype = {"same": b"multipart/mixed; boundary=" + boundary,
             "other": b"multipart/mixed; boundary=notthis",
             "missing": b"multipart/mixed",
             "quoted": b'multipart/mixed; boundary="' + boundary + b'"'}[announced]
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        if depth < 4 and draw(st.integers(0, 3)) == 0:
            parts.append(draw(multipart(depth + 1)))
        else:
            parts.append(draw(leaf()))
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    if draw(st.booleans()):
        body += b"--" + boundary + b"--\r\n"  # or the closing boundary is missing
    return b"Content-Type: " + ctype + b"\r\n\r\n" + body


@st.composite
def message(draw):
    top = draw(st.one_of(multipart(), leaf()))
    head = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: fuzz\r\nMIME-Version: 1.0\r\n"
    raw = head + top
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # CRLF only, as the spool holds it


def run_filter(raw, **options):
    f = attachments.AttachmentFilter(AttachmentsConfig(**options), Runner())
    verdict = result_of(f.on_data(None, corpus.parse(raw)))
    assert verdict.action in ACTIONS, verdict
    if verdict.reply is not None:
        assert isinstance(verdict.reply, Reply)
        assert 400 <= verdict.reply.code < 600
    return verdict


class MimeFuzz(unittest.TestCase):
    @fuzz
    @given(message())
    def test_every_message_gets_a_verdict(self, raw):
        run_filter(raw)

    @fuzz
    @given(message(), st.sampled_from(["reject", "quarantine", "strip"]),
           st.sampled_from(["reject", "accept"]))
    def test_under_every_action(self, raw, action, malformed):
        verdict = run_filter(raw, action=action, malformed=malformed, max_archive_depth=1,
                             max_parts=5, max_mime_depth=3)
        if verdict.message is not None:  # strip: what is left must still serialise
            verdict.message.as_bytes()


class Regressions(unittest.TestCase):
    """Crashes the fuzzer found, kept as plain tests (none so far: add each one here)."""

    def test_empty_boundary_and_truncated_zip(self):
        raw = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
               b"boundary=\r\n\r\n--\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding:"
               b" base64\r\n\r\n" + base64.encodebytes(corpus.zip_of([("a.exe", corpus.pe())])[:30])
               .replace(b"\n", b"\r\n") + b"\r\n----\r\n")
        run_filter(raw)
