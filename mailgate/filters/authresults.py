"""
The Authentication-Results header field (RFC 8601), as pure functions on str and bytes.

header() builds our one field from the filters' mailgate.verdict.AuthResult values; strip_forged()
removes every field in a message that claims to come from us (RFC 8601 section 5: an MTA must not
pass on results it did not produce under its own authserv-id).  Nothing here can inject a line:
every value has its CR, LF and other control characters removed before it is written, values
that are not RFC 2045 tokens are written as quoted strings, and method, result and property names
keep only the characters their grammar allows.  sanitize() and fold() are also used by the filter
chain for the headers that verdicts add.
"""

import re

NAME = "Authentication-Results"
MAX_LINE = 78  # RFC 5322 2.1.1: SHOULD; lines are folded at spaces where possible

# C0 (but tab) and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(r"[ \t]+")
# RFC 2045 token: US-ASCII printable, no SPACE, no tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# RFC 8601 Keyword (method, result, ptype, property), plus "/" for a method version (dkim/1) and
# "." between ptype and property.
_NOT_KEYWORD = re.compile(r"[^A-Za-z0-9_./-]")


def sanitize(text):
    """
    text (any value, made str) as one line: tabs become spaces, CR, LF and every other control
    character are removed, runs of spaces collapse to one, and the ends are trimmed.
    """
    text = _CONTROLS.sub("", str(text))
    return _SPACES.sub(" ", text).strip(" ")


def fold(line, limit=MAX_LINE):
    """
    Fold one unfolded header line (str, no CRLF) to lines of at most limit characters where
    possible: CRLF is inserted before an existing space, so unfolding (removing the CRLFs) gives
    back the line exactly, even inside a quoted string.  A word longer than limit stays whole.
    Returns the lines joined by CRLF, without a final CRLF.
    """
    lines = []
    while len(line) > limit:
        # The first space that may start a continuation line: not at the start of the line,
        # and not one whose line would hold nothing but white space.
        cut = line.rfind(" ", 1, limit + 1)
        if cut > 0 and not line[:cut].strip(" \t"):
            cut = -1
        if cut <= 0:
            cut = line.find(" ", limit + 1)
            if cut < 0:
                break
        lines.append(line[:cut])
        line = line[cut:]
    lines.append(line)
    return "\r\n".join(lines)


def value(text):
    """An RFC 8601 value: text as a token when it is one, else as a quoted string."""
    text = sanitize(text)
    if _TOKEN.fullmatch(text):
        return text
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def _keyword(text):
    return _NOT_KEYWORD.sub("", sanitize(text))


def resinfo(result):
    """
    One result as "method=result [reason="..."] ptype.property=value ...", or None when its method
    or result has no valid character left.
    """
    method, outcome = _keyword(result.method), _keyword(result.result)
    if not method or not outcome:
        return None
    parts = ["%s=%s" % (method, outcome)]
    if result.reason is not None and sanitize(result.reason):
        text = sanitize(result.reason)
        parts.append('reason="%s"' % text.replace("\\", "\\\\").replace('"', '\\"'))
    for name, prop_value in result.properties:
        name = _keyword(name)
        if name:
            parts.append("%s=%s" % (name, value(prop_value)))
    return " ".join(parts)


def header(authserv_id, results):
    """
    The whole field as bytes ending with CRLF:

        Authentication-Results: mx1.example.com;
        \tspf=pass smtp.mailfrom=example.org;
        \tdkim=pass header.d=example.org header.s=sel1

    one result a line (the ";" that RFC 8601 puts before each result ends the line above it);
    a result longer than a line is folded at its spaces.  With no results: "authserv-id; none".
    Text is UTF-8 (RFC 8601 2.2 allows it, via RFC 6532, for internationalised addresses); all
    else is ASCII.
    """
    first = "%s: %s" % (NAME, value(authserv_id))
    infos = [info for info in (resinfo(r) for r in results) if info is not None]
    if not infos:
        return (first + "; none\r\n").encode("utf-8")
    lines = [first + ";"]
    for i, info in enumerate(infos):
        lines.append(fold("\t" + info + (";" if i < len(infos) - 1 else "")))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Removing forged fields
# ---------------------------------------------------------------------------------------------


def _skip_cfws(text, i):
    """The index of the first character at or after i that is not white space or a comment."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            return i
        i += 1
    return i


def field_authserv_id(field):
    """
    The authserv-id of one Authentication-Results field (bytes, folded or not, with its name), as
    lower-case str without a trailing dot, or None when the field has none.
    """
    text = field.decode("latin-1")
    _, colon, rest = text.partition(":")
    if not colon:
        return None
    i = _skip_cfws(rest, 0)
    if rest[i:i + 1] == '"':
        out = []
        i += 1
        while i < len(rest) and rest[i] != '"':
            if rest[i] == "\\":
                i += 1
            if rest[i:i + 1] not in ("\r", "\n"):
                out.append(rest[i:i + 1])
            i += 1
        ident = "".join(out).strip()
    else:
        match = _TOKEN.match(rest, i)
        ident = match.group(0) if match else ""
    ident = ident.lower().rstrip(".")
    return ident or None


def _header_fields(raw):
    """
    Split the header block of raw into fields: yields (start, end, name) byte offsets, each field
    with its continuation lines and its CRLF.  name is the lower-case field name, or None for a
    line that is not a field (it is left alone).  Stops at the empty line ending the headers.
    """
    pos = 0
    field = None  # [start, end, name]
    while pos < len(raw):
        eol = raw.find(b"\r\n", pos)
        end = len(raw) if eol < 0 else eol + 2
        line = raw[pos:end]
        if line in (b"\r\n", b""):
            break
        if line[:1] in (b" ", b"\t") and field is not None:
            field[1] = end
        else:
            if field is not None:
                yield tuple(field)
            name, colon, _ = line.partition(b":")
            name = name.rstrip(b" \t")
            ok = colon and name and all(33 <= b <= 126 for b in name)
            field = [pos, end, name.decode("ascii").lower() if ok else None]
        pos = end
    if field is not None:
        yield tuple(field)


# Header fields only this gateway writes (the DMARC tag of quarantine_action = tag): an incoming
# one is a forgery, whatever it says.
OWN_FIELDS = frozenset({"x-mailgate-dmarc"})


def strip_forged(raw, authserv_id):
    """
    raw (message bytes, CRLF line ends) without the Authentication-Results fields, continuation
    lines included, whose authserv-id is ours (compared without case, ignoring a version after
    it and comments before it), and without any of OWN_FIELDS.  Other fields, their order and
    the body are kept byte for byte; only the header block is read.
    """
    ours = str(authserv_id).lower().rstrip(".")
    drop = [(start, end) for start, end, name in _header_fields(raw)
            if name in OWN_FIELDS
            or (name == "authentication-results" and field_authserv_id(raw[start:end]) == ours)]
    if not drop:
        return raw
    out, pos = [], 0
    for start, end in drop:
        out.append(raw[pos:start])
        pos = end
    out.append(raw[pos:])
    return b"".join(out)
