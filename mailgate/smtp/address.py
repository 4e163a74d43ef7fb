"""
Strict RFC 5321 parsing of the MAIL FROM, RCPT TO and EHLO/HELO arguments.

The server hands us the text after the verb, decoded from the wire as latin-1, so a byte >= 0x80
shows up as a non-ASCII character.  An address is UTF-8 (RFC 6531) only in a transaction whose
MAIL carried SMTPUTF8: then the path is decoded as UTF-8 and its local part may hold any
printable non-ASCII character and its domain U-labels (checked with IDNA, compared elsewhere in
A-label form); without SMTPUTF8 a non-ASCII path is 553 5.6.7.  Every rejection is a ReplyError carrying the exact reply, so the
server answers without interpreting anything.  The parsing is strict on purpose: this is the edge,
and whatever passes here ends up in headers, queue files and relay decisions downstream.
"""

import ipaddress
import re
import unicodedata

from mailgate import idn
from mailgate.envelope import Address, Reply
from mailgate.errors import ReplyError
from mailgate.smtp import params as esmtp

MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, brackets and source route included
MAX_LABEL = 63  # RFC 1035 2.3.4: a longer label can never resolve

INVALID_CHARACTER = Reply(501, "5.5.4", "Invalid character in command")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")

NULL_SENDER = Address("", "")
POSTMASTER = Address("postmaster", "")

# --- RFC 5321 4.1.2 / 4.1.3 grammar, ASCII only (explicit classes: no re.IGNORECASE surprises) ---
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = r"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = r"%s(?:\.%s)*" % (_LABEL, _LABEL)
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"  # dcontent; what is inside is checked by _literal()
_ADL = r"@%s(?:,@%s)*" % (_DOMAIN, _DOMAIN)
_PATH_RE = re.compile(
    r"<(?:(?P<adl>%s):)?(?P<local>%s|%s)@(?P<domain>%s|%s)>"
    % (_ADL, _DOT_STRING, _QUOTED_STRING, _DOMAIN, _LITERAL)
)
_DOT_STRING_RE = re.compile(_DOT_STRING)
# RFC 6531 3.3: atext and qtext take UTF8-non-ascii too (the domain is checked by IDNA instead).
_U = r"\u0080-\U0010ffff"
_UTF8_ATEXT = r"[A-Za-z0-9!#$%%&'*+/=?^_`{|}~%s-]" % _U
_UTF8_DOT_STRING = r"%s+(?:\.%s+)*" % (_UTF8_ATEXT, _UTF8_ATEXT)
_UTF8_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e%s]|\\[\x20-\x7e%s])*"' % (_U, _U)
_UTF8_DOMAIN = r"[^\x00-\x20\x7f@<>\[\]\\\"]+"
_UTF8_PATH_RE = re.compile(
    r"<(?:(?P<adl>%s):)?(?P<local>%s|%s)@(?P<domain>%s|%s)>"
    % (_ADL, _UTF8_DOT_STRING, _UTF8_QUOTED, _UTF8_DOMAIN, _LITERAL)
)
_UTF8_DOT_STRING_RE = re.compile(_UTF8_DOT_STRING)
_TAG_RE = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")  # Standardized-tag = Ldh-str
_DCONTENT_RE = re.compile(r"[\x21-\x5a\x5e-\x7e]+")
_IPV6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+")  # no "%zone": ipaddress would accept one

# Real Windows hosts put underscores in their names, so EHLO labels may hold them anywhere.
_HELO_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HELO_DOMAIN_RE = re.compile(r"%s(?:\.%s)*" % (_HELO_LABEL, _HELO_LABEL))

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _fail(reply):
    raise ReplyError(reply)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def is_ip_address(text):
    """True when text is a bare IPv4 or IPv6 address (no brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_mail(arg):
    """
    Parse the argument of MAIL (e.g. 'FROM:<a@b.example> SIZE=123') into (Address, params).
    <> is the null sender Address("", ""); params has upper-case keys (mailgate.smtp.params:
    SIZE an int, BODY, SMTPUTF8 True, RET, ENVID decoded).  With SMTPUTF8 the path may be UTF-8.
    """
    path, rest = _split(arg, "FROM:", MAIL_SYNTAX)
    utf8 = esmtp.SMTPUTF8_RE.search(rest) is not None
    path = _decode(path, utf8, BAD_SENDER)
    address = NULL_SENDER if path == "<>" else _parse_path(path, BAD_SENDER, utf8)
    return address, esmtp.parse(rest, esmtp.MAIL, MAIL_SYNTAX)


def parse_rcpt(arg, smtputf8=False):
    """
    Parse the argument of RCPT (e.g. 'TO:<u@d.example>') into (Address, params: NOTIFY, ORCPT).
    <Postmaster> without a domain is accepted (RFC 5321 4.5.1) as Address("postmaster", ""); <>
    is refused.  smtputf8: the transaction's MAIL carried SMTPUTF8, so the path may be UTF-8.
    """
    path, rest = _split(arg, "TO:", RCPT_SYNTAX)
    path = _decode(path, smtputf8, BAD_RECIPIENT)
    if path[1:-1].lower() == "postmaster":
        address = POSTMASTER
    else:
        address = _parse_path(path, BAD_RECIPIENT, smtputf8)
    return address, esmtp.parse(rest, esmtp.RCPT, RCPT_SYNTAX)


def parse_helo(arg, verb="EHLO"):
    """
    The client's name from the argument of EHLO/HELO: a domain (underscores tolerated) or an IPv4
    or IPv6 address literal.  It goes into our Received header, so nothing that could break out
    of it (spaces, parentheses, semicolons, quotes, controls, non-ASCII) is accepted.
    verb only changes the reply text.
    """
    if _CONTROL_RE.search(arg):
        _fail(INVALID_CHARACTER)
    name = arg.strip(" ")
    if not name:
        _fail(Reply(501, "5.5.4", "Syntax: %s hostname" % (verb,)))
    if name.startswith("[") and name.endswith("]"):
        literal = _literal(name[1:-1], general=False) if name.isascii() else None
        if literal is not None:
            return literal
    elif _valid_domain(name, _HELO_DOMAIN_RE):
        return name
    _fail(Reply(501, "5.5.4", "Invalid %s hostname" % (verb,)))


# ---------------------------------------------------------------------------------------------
# The command line: keyword, path, parameters
# ---------------------------------------------------------------------------------------------


def _split(arg, keyword, syntax):
    """
    Split 'KEYWORD:<path> params' into the path (brackets included) and the parameter text.
    Spaces after the colon are tolerated (common in the wild); the brackets are not optional.
    """
    if _CONTROL_RE.search(arg):
        _fail(INVALID_CHARACTER)
    text = arg.lstrip(" ")
    head = text[: len(keyword)]
    if not (head.isascii() and head.upper() == keyword):
        _fail(syntax)
    text = text[len(keyword) :].lstrip(" ")
    if not text.startswith("<"):
        _fail(syntax)
    end = _path_end(text)
    if end is None:
        if ">" not in text:
            _fail(syntax)
        # Both brackets are there but a quote or '[' is never closed: a bad path, not bad syntax.
        return text, ""
    path, rest = text[:end], text[end:]
    if rest and not rest.startswith(" "):
        _fail(syntax)
    return path, rest


def _path_end(text):
    """
    Index just past the '>' closing the path that text starts with, or None.  A '>' inside a
    quoted local part or an address literal does not close the path, so this cannot simply
    search for the first '>'.
    """
    state = None
    i = 1
    while i < len(text):
        char = text[i]
        if state == '"':
            if char == "\\":
                i += 1
            elif char == '"':
                state = None
        elif state == "[":
            if char == "]":
                state = None
        elif char in '"[':
            state = char
        elif char == ">":
            return i + 1
        i += 1
    return None


# ---------------------------------------------------------------------------------------------
# The path itself
# ---------------------------------------------------------------------------------------------


def _decode(path, utf8, bad):
    """
    The path as text: ASCII as it is; with SMTPUTF8 the latin-1 text of the wire bytes decoded
    as UTF-8 (NFC, no control, format or separator characters); without it 553 5.6.7.
    """
    if path.isascii():
        return path
    if not utf8:
        _fail(NON_ASCII_ADDRESS)
    try:
        text = path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        _fail(bad)
    if any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp", "Zs") for c in text
           if not c.isascii()):
        _fail(bad)
    return unicodedata.normalize("NFC", text)


def _parse_path(path, bad, utf8=False):
    """
    '<[@route,...:]local@domain>' into an Address.  A source route is checked, then dropped:
    relaying is decided on the final mailbox only (RFC 5321 C: a server may ignore the route).
    Limits are in octets, as the RFCs count them (RFC 6531 3.3).
    """
    size = len(path.encode("utf-8")) if utf8 else len(path)
    grammar = _UTF8_PATH_RE if utf8 and not path.isascii() else _PATH_RE
    match = grammar.fullmatch(path) if size <= MAX_PATH else None
    if match is None:
        _fail(bad)
    adl = match.group("adl")
    if adl and not all(_valid_domain(hop[1:], _PATH_DOMAIN_RE) for hop in adl.split(",")):
        _fail(bad)
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        _fail(bad)
    if domain.startswith("["):
        domain = _literal(domain[1:-1], general=True)
    elif domain.isascii() and _valid_domain(domain, _PATH_DOMAIN_RE):
        domain = domain.lower()
    elif not domain.isascii() and idn.is_valid(domain):
        domain = domain.lower()
        if not _valid_domain(idn.a_label(domain), _PATH_DOMAIN_RE):
            _fail(bad)
    else:
        domain = None
    if domain is None:
        _fail(bad)
    return Address(_normalise_local(local, utf8), domain)


_PATH_DOMAIN_RE = re.compile(_DOMAIN)


def _valid_domain(domain, grammar):
    """Length limits first (they also bound the regex's work), then the label grammar."""
    if len(domain) > MAX_DOMAIN or any(len(label) > MAX_LABEL for label in domain.split(".")):
        return False
    return grammar.fullmatch(domain) is not None


def _literal(content, general):
    """
    The normalised '[...]' form of an address literal's content, or None when it is not one:
    IPv4 '192.0.2.1', 'IPv6:2001:db8::1' (tag normalised to 'IPv6:'), or when general is true
    a General-address-literal 'tag:dcontent' (lower-cased like any domain).
    """
    tag, colon, rest = content.partition(":")
    if not colon:
        return "[%s]" % (content,) if _is_ip(ipaddress.IPv4Address, content) else None
    if tag.lower() == "ipv6":
        if _IPV6_CHARS_RE.fullmatch(rest) and _is_ip(ipaddress.IPv6Address, rest):
            return "[IPv6:%s]" % (rest.lower(),)
        return None
    if general and _TAG_RE.fullmatch(tag) and _DCONTENT_RE.fullmatch(rest):
        return "[%s]" % (content.lower(),)
    return None


def _is_ip(kind, text):
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _normalise_local(local, utf8=False):
    """
    A quoted local part loses its quotes when they were unnecessary ('"joe"' is 'joe'); otherwise
    it keeps them, with only '"' and '\\' escaped, so an '@', '%' or '!' hidden in quotes stays
    visible to the relay check.
    """
    if not local.startswith('"'):
        return local
    content = re.sub(r"\\(.)", r"\1", local[1:-1], flags=re.DOTALL)
    if (_UTF8_DOT_STRING_RE if utf8 else _DOT_STRING_RE).fullmatch(content):
        return content
    return '"%s"' % (content.replace("\\", "\\\\").replace('"', '\\"'),)
