"""
A MIME part's content as a client would decode it: decode_payload (the payload bytes as
received, then base64, quoted-printable or uuencode by the Content-Transfer-Encoding's first
token), leniently where the email package is strict and the other way round.

Separate because it is the one place that turns a part into bytes: the walk examines what it
returns, and tests patch the walk's reference to it to make one part fail.
"""

import base64
import binascii
import io
import quopri
import re


def _cte(part):
    """
    The Content-Transfer-Encoding's first token, lower-case: "base64" also for "base64 (a
    comment)", "BASE64; junk" or '"base64"', which clients decode as base64 while the email
    package would not decode them at all.
    """
    for name, value in part.raw_items():
        if name.lower() == "content-transfer-encoding":
            match = re.match(r'[\s"]*([A-Za-z0-9_-]+)', str(value))
            return match.group(1).lower() if match else ""
    return ""


_NO_PAYLOAD = object()


def _raw_payload(part):
    """
    The payload bytes as received.  Not part.get_payload(): for 8-bit content it decodes the
    bytes with the part's charset, replacing what does not decode (an 8bit or binary executable
    would lose its headers), and it raises on some charset names.
    """
    payload = getattr(part, "_payload", _NO_PAYLOAD)
    if payload is _NO_PAYLOAD:
        payload = part.get_payload()
    if payload is None:
        return b""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if not isinstance(payload, str):
        return str(payload).encode("utf-8", "replace")
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeError:  # text set by a program, not parsed from bytes
        return payload.encode("utf-8", "surrogateescape")


def _decode_base64(data):
    """
    As the email package decodes it (bad characters ignored, padding added); -> (bytes, ok).
    When the length is impossible, the best guess (the stray last character dropped), not ok.
    """
    data = b"".join(data.split())
    missing = b"==="[:4 - len(data) % 4] if len(data) % 4 else b""
    try:
        return base64.b64decode(data + missing, validate=True), True
    except binascii.Error:
        pass
    for extra in (b"", b"==", b"=="):
        try:
            return base64.b64decode(data + extra, validate=False), True
        except binascii.Error:
            continue
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    try:
        return base64.b64decode(clean[:len(clean) - len(clean) % 4], validate=False), False
    except binascii.Error:
        return b"", False


def _decode_uu(data, limit=None):
    """The first uuencoded file in data (at most about limit bytes of it) -> (bytes, ok)."""
    out = []
    size = 0
    started = False
    for line in io.BytesIO(data):
        line = line.rstrip(b"\r\n")
        if limit is not None and size >= limit:
            break
        if not started:
            started = line.startswith(b"begin ")
            continue
        if line.strip() == b"end":
            break
        try:
            piece = binascii.a2b_uu(line)
        except binascii.Error:
            return b"".join(out), False
        out.append(piece)
        size += len(piece)
    return b"".join(out), started


def decode_payload(part):
    """The decoded bytes of a leaf part -> (bytes, problem or None)."""
    raw = _raw_payload(part)
    cte = _cte(part)
    if cte == "base64":
        data, ok = _decode_base64(raw)
        return data, None if ok else "base64 content cannot be decoded"
    if cte == "quoted-printable":
        return quopri.decodestring(raw), None
    if cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        data, ok = _decode_uu(raw)
        return data, None if ok else "uuencoded content cannot be decoded"
    return raw, None
