"""
Delivery status notifications (RFC 3464): the bounce and the delay warning sent to a sender.

Pure functions: the same arguments give the same bytes (the Message-ID and the MIME boundary are
derived from them), so the caller decides when and how to queue the result.  The notice is sent
from the null reverse-path <> (RFC 5321 4.5.5), which the caller does; should_bounce says whether
a message deserves one at all (a notice about a notice would loop).

The DSN options of the original message (RFC 3461) are honoured: which recipients get a notice
is the caller's (their NOTIFY), RET=HDRS returns the header block only, RET=FULL the whole
message (as message/rfc822 when it is 7-bit and at most MAX_RETURN octets, otherwise its headers
with a note saying so), no RET the headers; ENVID comes back as Original-Envelope-Id and each
ORCPT as Original-Recipient.

The output is plain 7-bit MIME with CRLF line endings and no line over 998 octets, so that it can
be relayed by any MTA whatever the original message was: text that is not ASCII (a remote's reply,
an SMTPUTF8 address, 8-bit original headers) is quoted-printable in the text parts, and in the
machine-readable part it is written the way RFC 6533 (utf-8-addr-xtext) or RFC 3464 (ASCII text)
allow.
"""

import datetime
import email.charset
import email.quoprimime
import email.utils
import hashlib
import re
import textwrap

ACTIONS = ("failed", "delayed", "relayed")
NOTIFY_OF = {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS"}

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
}

# RET=FULL returns the whole message up to this size (Postfix's bounce_size_limit).
MAX_RETURN = 50 * 1024

# At most this much of the original header block is returned (a huge one would make a huge bounce).
MAX_HEADERS = 64 * 1024

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_FOLD_AT = 78
_MAX_LINE = 998


def should_bounce(envelope):
    """A notice goes to the sender unless that is the null reverse-path (never bounce a bounce)."""
    return bool(envelope.sender)


def make_dsn(hostname, envelope, data, failures, now, action="failed", retry_until=None):
    """
    The RFC 3464 notice (bytes, CRLF line endings) from MAILER-DAEMON@hostname to envelope.sender.

    failures is a list of (RecipientResult, last attempt timestamp or None); action is "failed"
    (a bounce: these recipients will never get it; an expired message is "failed" with the 4.4.7
    status its results carry) or "delayed" (a warning: still trying, until retry_until when given,
    a POSIX timestamp).  data is the original message: its header block is returned as
    text/rfc822-headers.
    """
    if action not in ACTIONS:
        raise ValueError("action must be one of %s, not %r" % (", ".join(ACTIONS), action))
    failures = list(failures)
    if not failures:
        raise ValueError("a DSN needs at least one recipient")

    returned, whole = _returned_part(data, getattr(envelope, "ret", None))
    parts = [
        _text_part(hostname, envelope, failures, action, retry_until, whole),
        _status_part(hostname, envelope, failures, action, retry_until),
        returned,
    ]
    seed = "\0".join(
        [hostname, str(envelope.queue_id), envelope.sender, repr(now), action]
        + ["%s\0%r" % (result.recipient, at) for result, at in failures]
    ).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(seed).hexdigest()
    boundary = _boundary(digest, parts)

    headers = [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
        "To: %s" % _to_header(envelope.sender),
        "Subject: %s" % SUBJECTS[action],
        "Date: %s" % _date(now),
        "Message-ID: <dsn.%s.%s@%s>" % (int(now), digest[:20], hostname),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="%s"' % boundary,
        "Content-Transfer-Encoding: 7bit",
    ]
    preamble = b"This is a MIME-encapsulated delivery status notification.\r\n"
    out = [_crlf(headers), b"\r\n", preamble]
    for part in parts:
        out += [b"\r\n--", boundary.encode("ascii"), b"\r\n", part]
    out += [b"\r\n--", boundary.encode("ascii"), b"--\r\n"]
    return b"".join(out)


# --- the three parts (each: its MIME headers, an empty line, its body ending in CRLF) ----------


def _text_part(hostname, envelope, failures, action, retry_until, whole=False):
    paragraphs = ["This is the mail system at %s." % hostname]
    if action == "relayed":
        paragraphs.append(
            "Your message was delivered to the servers below, which do not send delivery "
            "notifications themselves: this is the last notice you will get about these "
            "recipients."
        )
    elif action == "failed":
        paragraphs.append(
            "Your message could not be delivered to one or more of its recipients. "
            "This is a permanent error: it will not be retried. "
            "The recipients and the reasons are listed below."
        )
    else:
        until = _date(retry_until) if retry_until else None
        paragraphs.append(
            "Your message has not yet been delivered to one or more of its recipients. "
            "This is only a warning: you do not need to send the message again. "
            + (
                "Delivery will be retried until %s; " % until
                if until
                else "Delivery will be retried for a while; "
            )
            + "if it still fails by then, you will get another notice."
        )
    facts = []
    if envelope.queue_id:
        facts.append("Queue ID: %s" % envelope.queue_id)
    if envelope.received_at:
        facts.append("Received: %s" % _date(envelope.received_at))
    lines = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(paragraph, 72) + [""]
    if facts:
        lines += facts + [""]
    for result, _at in failures:
        lines.append("<%s>:" % result.recipient)
        reply = _reply_text(result)
        if result.remote is not None and getattr(result.remote, "name", None):
            lines.append("    %s said:" % result.remote.name)
            lines += ["        " + line for line in reply.split("\n")] if reply else []
        elif reply:
            lines += ["    " + line for line in reply.split("\n")]
        else:
            lines.append("    (no further details)")
        lines.append("")
    lines.append("Your message is attached." if whole else "The headers of your message are attached.")
    text = "\r\n".join(_clean(line) for line in lines) + "\r\n"
    return _text_body("text/plain", text)


def _status_part(hostname, envelope, failures, action, retry_until):
    blocks = []
    fields = ["Reporting-MTA: dns; %s" % hostname]
    envid = getattr(envelope, "envid", None)
    if envid:
        fields.append("Original-Envelope-Id: %s" % _ascii(envid))
    if envelope.queue_id:
        fields.append("X-Mailgate-Queue-ID: %s" % _ascii(str(envelope.queue_id)))
    if envelope.received_at:
        fields.append("Arrival-Date: %s" % _date(envelope.received_at))
    blocks.append(fields)
    for result, at in failures:
        orcpt = envelope.orcpt(result.recipient) if hasattr(envelope, "orcpt") else None
        fields = ["Original-Recipient: %s" % _original(orcpt)] if orcpt else []
        fields += [
            "Final-Recipient: %s" % _address_type(result.recipient),
            "Action: %s" % action,
            "Status: %s" % _status(result, action),
        ]
        remote = getattr(result.remote, "name", None) or getattr(result.remote, "address", None)
        if remote:
            fields.append("Remote-MTA: dns; %s" % _ascii(str(remote)).replace(" ", ""))
        if result.code:
            fields.append("Diagnostic-Code: smtp; %s" % _ascii(_reply_line(result)))
        if at:
            fields.append("Last-Attempt-Date: %s" % _date(at))
        if action == "delayed" and retry_until:
            fields.append("Will-Retry-Until: %s" % _date(retry_until))
        blocks.append(fields)
    body = b"\r\n".join(b"".join(_fold(field) for field in block) for block in blocks)
    head = b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    return head + body


def _returned_part(data, ret):
    """(the third part, whether it is the whole message): RET=FULL, else the headers."""
    data = bytes(data)
    if ret == "FULL":
        lines_ok = all(len(line) <= _MAX_LINE for line in data.split(b"\r\n"))
        if len(data) <= MAX_RETURN and data.isascii() and lines_ok:
            head = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            body = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
            return head + body, True
    return _headers_part(data), False


def _original(orcpt):
    """An ORCPT value ("rfc822;addr") as the Original-Recipient field writes it."""
    kind, _, address = orcpt.partition(";")
    return "%s; %s" % (kind, _ascii(address))


def _headers_part(data):
    """The original header block, up to the first empty line (at most MAX_HEADERS of it)."""
    block = _header_block(data)
    text = block.decode("latin-1")  # bytes kept as they are: only a transfer encoding is added
    ascii_ok = all(ord(c) < 128 for c in text)
    lines_ok = all(len(line) <= _MAX_LINE for line in block.split(b"\r\n"))
    if ascii_ok and lines_ok:
        head = b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        return head + block
    head = (
        b"Content-Type: text/rfc822-headers; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    return head + _qp(text)


def _header_block(data):
    data = bytes(data)
    match = re.search(rb"\r?\n\r?\n", data)
    if data.startswith((b"\r\n", b"\n")):
        block = b""
    elif match:
        block = data[: match.start()]
    else:
        block = data
    if len(block) > MAX_HEADERS:
        cut = block.rfind(b"\n", 0, MAX_HEADERS)
        block = block[: cut if cut > 0 else MAX_HEADERS]
    lines = re.split(rb"\r?\n", block.rstrip(b"\r\n")) if block.strip() else []
    return b"".join(line.replace(b"\r", b"") + b"\r\n" for line in lines)


# --- helpers ----------------------------------------------------------------------------------


def _text_body(content_type, text):
    """A text/* part: 7bit when it is short-lined ASCII, else UTF-8 quoted-printable."""
    if text.isascii() and all(len(line) <= _FOLD_AT for line in text.split("\r\n")):
        head = "Content-Type: %s; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        return (head % content_type).encode("ascii") + text.encode("ascii")
    head = "Content-Type: %s; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    octets = text.encode("utf-8", "replace").decode("latin-1")
    return (head % content_type).encode("ascii") + _qp(octets)


def _qp(text):
    """Quoted-printable of text whose characters stand for bytes (latin-1), CRLF lines."""
    lines = text.split("\r\n")
    if lines and lines[-1] == "":
        lines.pop()
    encoded = email.quoprimime.body_encode("\n".join(lines), maxlinelen=76, eol="\r\n")
    return encoded.encode("ascii") + b"\r\n"


def _boundary(digest, parts):
    """A boundary derived from digest that none of the parts contains."""
    for n in range(1000):
        boundary = "=_mailgate_dsn_%s_%d" % (digest[:24], n)
        marker = boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary
    raise AssertionError("no usable MIME boundary")  # pragma: no cover


def _reply_text(result):
    """'550 5.1.1 text' (multi-line text keeps its lines), or the text alone without a code."""
    text = str(result.text or "").replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if not result.code:
        return text
    words = ["%03d" % result.code] + ([result.status] if result.status else [])
    lines = text.split("\n") if text else [""]
    return "\n".join(" ".join(words + ([line] if line else [])) for line in lines)


def _reply_line(result):
    """The reply on one line: '550 5.1.1 first line second line'."""
    text = " ".join(str(result.text or "").split())
    return " ".join(w for w in ("%03d" % result.code, result.status or "", text) if w)


def _status(result, action):
    status = str(result.status or "").strip()
    if _STATUS.fullmatch(status):
        return status
    if 400 <= result.code < 600:
        return "%d.0.0" % (result.code // 100)
    return "5.0.0" if action == "failed" else "4.0.0"


def _address_type(address):
    """RFC 3464 'rfc822; addr', or RFC 6533 'utf-8; ...' in its 7-bit xtext form."""
    if address.isascii() and not re.search(r"[\x00-\x20\x7f]", address):
        return "rfc822; %s" % address
    out = []
    for c in address:
        if "\x21" <= c <= "\x7e" and c not in "+=\\":
            out.append(c)
        else:
            out.append("\\x{%X}" % ord(c))
    return "utf-8; %s" % "".join(out)


def _to_header(sender):
    if sender.isascii() and not re.search(r"[\x00-\x20\x7f]", sender):
        return "<%s>" % sender
    local, _, domain = sender.rpartition("@")
    try:
        ace = domain.encode("idna").decode("ascii")
    except UnicodeError:
        ace = None
    if ace and local.isascii() and not re.search(r"[\x00-\x20\x7f]", local):
        return "<%s@%s>" % (local, ace)
    # A non-ASCII local part has no ASCII form: name the sender in an empty group's display name
    # (an RFC 2047 encoded word), which keeps the header valid 7-bit RFC 5322.
    return "%s:;" % email.charset.Charset("utf-8").header_encode(sender)


def _date(timestamp):
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return email.utils.format_datetime(moment)


def _clean(text):
    """One line of text: control characters (CR, LF, tabs...) become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _ascii(text):
    """Printable ASCII for the delivery-status fields: anything else becomes '?'."""
    return re.sub(r"[^\x20-\x7e]", "?", _clean(text))


def _fold(field):
    """One header-style field as CRLF-terminated bytes, folded at spaces (hard-cut if need be)."""
    words = re.sub(" +", " ", field).split(" ")
    lines = []
    line = words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > _FOLD_AT and line.strip():
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    out = []
    for line in lines:
        while len(line) > _MAX_LINE - 2:
            out.append(line[: _MAX_LINE - 2])
            line = " " + line[_MAX_LINE - 2:]
        out.append(line)
    return "".join(line + "\r\n" for line in out).encode("ascii")


def _crlf(lines):
    return "".join(line + "\r\n" for line in lines).encode("ascii")
