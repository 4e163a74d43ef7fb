"""
The ESMTP parameters of MAIL and RCPT: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531),
and the DSN parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461).

Each parameter is checked and turned into a value here; a bad one is a ReplyError with the
reply to give (501 5.5.4 for a malformed value, 555 5.5.4 for a parameter we do not offer).
xtext (RFC 3461 4) is decoded when read and encoded again only when the value is passed on to a
next hop (mailgate.delivery), so the envelope keeps plain text: ENVID and ORCPT may only hold
printable ASCII once decoded (their limits: 100 and 500 characters).  BODY=BINARYMIME is not
offered: the spool, the filters and DATA-based delivery all work on CRLF text.
"""

import re

from mailgate.envelope import Reply
from mailgate.errors import ReplyError

BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter")
BAD_NOTIFY = Reply(501, "5.5.4", "Bad NOTIFY parameter")
BAD_ORCPT = Reply(501, "5.5.4", "Bad ORCPT parameter")

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2

_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # esmtp-keyword
SMTPUTF8_RE = re.compile(r"(?:^| )SMTPUTF8(?= |$)", re.IGNORECASE)  # MAIL's, before its path
_SIZE_RE = re.compile(r"[0-9]{1,20}")  # RFC 1870 size-value
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # an atom, in practice rfc822 / utf-8
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


def _fail(reply):
    raise ReplyError(reply)


def xtext_decode(value, bad):
    """xtext (RFC 3461 4) to text; only printable ASCII may come out."""
    if value is None or not _XTEXT_RE.fullmatch(value):
        _fail(bad)
    text = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    if any(not 0x20 <= ord(c) <= 0x7e for c in text):
        _fail(bad)
    return text


def xtext_encode(text):
    """Text to xtext: '+', '=' and anything outside ! to ~ as +XX."""
    return "".join(c if "\x21" <= c <= "\x7e" and c not in "+=" else "+%02X" % ord(c)
                   for c in text.encode("utf-8").decode("latin-1"))


def _size(value):
    if value is None or not _SIZE_RE.fullmatch(value):
        _fail(BAD_SIZE)
    return int(value)


def _body(value):
    body = value.upper() if value is not None and value.isascii() else None
    if body not in ("7BIT", "8BITMIME"):
        _fail(BAD_BODY)
    return body


def _smtputf8(value):
    if value is not None:
        _fail(BAD_SMTPUTF8)
    return True


def _ret(value):
    ret = value.upper() if value is not None and value.isascii() else None
    if ret not in ("FULL", "HDRS"):
        _fail(BAD_RET)
    return ret


def _envid(value):
    text = xtext_decode(value, BAD_ENVID)
    if not text or len(text) > MAX_ENVID:
        _fail(BAD_ENVID)
    return text


def _notify(value):
    """NEVER, or a list of SUCCESS, FAILURE, DELAY: the tuple of words, upper case."""
    if value is None or not value.isascii():
        _fail(BAD_NOTIFY)
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or any(w not in _NOTIFY for w in words) or len(set(words)) != len(words):
        _fail(BAD_NOTIFY)
    return tuple(w for w in _NOTIFY if w in words)


def _orcpt(value):
    """addr-type ";" xtext -> "type;address" with the address decoded (utf-8 kept as sent)."""
    if value is None or ";" not in value or len(value) > MAX_ORCPT:
        _fail(BAD_ORCPT)
    kind, _, address = value.partition(";")
    if not _ADDR_TYPE_RE.fullmatch(kind) or not address:
        _fail(BAD_ORCPT)
    kind = kind.lower()
    if kind == "utf-8":
        # RFC 6533 utf-8-addr-xtext: printable ASCII with \x{HEX} escapes; kept as it came.
        if not _XTEXT_RE.fullmatch(address):
            _fail(BAD_ORCPT)
        return "%s;%s" % (kind, address)
    return "%s;%s" % (kind, xtext_decode(address, BAD_ORCPT))


MAIL = {"SIZE": _size, "BODY": _body, "SMTPUTF8": _smtputf8, "RET": _ret, "ENVID": _envid}
RCPT = {"NOTIFY": _notify, "ORCPT": _orcpt}


def parse(rest, supported, syntax):
    """
    Space-separated KEYWORD[=VALUE] into a dict with upper-case keys; supported maps a keyword
    to the function checking and converting its value (None when there is no '=').
    """
    params = {}
    for token in rest.split(" "):
        if not token:
            continue
        keyword, has_value, value = token.partition("=")
        if not _KEYWORD_RE.fullmatch(keyword):
            _fail(syntax)
        keyword = keyword.upper()
        if keyword not in supported:
            _fail(Reply(555, "5.5.4", "Unsupported parameter %s" % (keyword,)))
        if keyword in params:
            _fail(Reply(501, "5.5.4", "Duplicate parameter %s" % (keyword,)))
        params[keyword] = supported[keyword](value if has_value else None)
    return params


def orcpt_for_next_hop(orcpt, recipient):
    """The ORCPT value to send: the client's (re-encoded), else rfc822;<the recipient>."""
    if orcpt:
        kind, _, address = orcpt.partition(";")
        return "%s;%s" % (kind, address if kind == "utf-8" else xtext_encode(address))
    if recipient.isascii():
        return "rfc822;" + xtext_encode(recipient)
    return None  # a UTF-8 address without ORCPT: nothing to say (RFC 6533 would need utf-8-addr)


def envelope_fields(mail, rcpts):
    """The Envelope's SMTPUTF8 and DSN fields from MAIL's params and {recipient: RCPT params}."""
    return dict(
        smtputf8=bool(mail.get("SMTPUTF8")), ret=mail.get("RET"), envid=mail.get("ENVID"),
        dsn=tuple((r, p.get("NOTIFY"), p.get("ORCPT")) for r, p in rcpts.items()
                  if "NOTIFY" in p or "ORCPT" in p))
