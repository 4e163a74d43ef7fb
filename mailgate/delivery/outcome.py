"""
The reply-to-outcome mapping of outbound delivery: what a remote's reply (or our own trouble on
our side of the wire) means for each recipient of an attempt.

Pure functions and values, no Twisted protocol state: DeliverySender and Deliverer
(mailgate.delivery.client) decide *when* a reply counts; this module says what it is reported
as, so the rules can be read (and tested) in one place.

Outcomes.  A reply of the remote is reported as it is (code, enhanced status split from the text,
or derived from the code); a 5xx that we treat as temporary (greeting, EHLO, STARTTLS, AUTH) is
reported as 451 with the status class changed to 4 and the remote's reply in the text.  Our own
replies for trouble on our side of the wire:
  451 4.4.1  connection refused / connect timeout / cannot connect (remote is None: no session)
  451 4.4.2  timeout waiting for a reply, DATA not finished in data_timeout, connection lost
  451 4.4.4  no hop to try, or a hop address that is not an IP literal (we never resolve names)
  451 4.5.0  unexpected or malformed reply
  451 4.7.0  STARTTLS response injection; AUTH required but not offered
  451 4.7.4  TLS required (required/verify) but STARTTLS not offered or refused
  451 4.7.5  TLS handshake or certificate verification failed
  451 4.7.10 credentials configured but no TLS session: credentials not sent
  451 4.3.5  our own TLS configuration cannot be loaded
  553 5.1.7 / 5.1.3  sender / recipient address holding control characters (never sent)
"""

import re

import attr
from twisted.mail import smtp
from twisted.python import failure

from mailgate.envelope import RecipientResult

_STATUS = re.compile(rb"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:[ \t]+|$)")


# --- replies -----------------------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class _Reason:
    code = attr.ib()
    status = attr.ib()
    text = attr.ib()


def default_status(code):
    """The enhanced status to report when a reply carries none: 2.0.0, 4.0.0 or 5.0.0."""
    return "%d.0.0" % (code // 100) if 200 <= code < 600 and code // 100 in (2, 4, 5) else ""


def parse_reply(code, resp):
    """
    (code, status, text) from a reply's code and its text lines (bytes joined by "\\n", as
    SMTPClient collects them).  The RFC 3463 status in front of the text is split off (from each
    line that repeats it) when its class matches the code's; otherwise it is derived from the code.
    """
    if isinstance(resp, str):
        resp = resp.encode("utf-8", "replace")
    lines = (resp or b"").split(b"\n")
    match = _STATUS.match(lines[0])
    status = None
    if match and int(match.group(1)) == code // 100:
        status = b".".join(match.groups())
        prefix = re.compile(re.escape(status) + rb"(?:[ \t]+|$)")
        lines = [prefix.sub(b"", line, count=1) if prefix.match(line) else line for line in lines]
    text = b"\n".join(lines).decode("utf-8", "replace")
    return _Reason(code, status.decode("ascii") if status else default_status(code), text)


def _temporary(reason, where):
    """A remote reply as a temporary hop failure: 4xx as is, anything else as our 451."""
    if 400 <= reason.code < 500:
        return reason
    said = " ".join(str(part) for part in (reason.code, reason.status, reason.text) if part)
    if 500 <= reason.code < 600:
        status = "4" + reason.status[1:] if reason.status else "4.0.0"
        return _Reason(451, status, "%s said: %s (in reply to %s; treated as temporary)"
                       % (where[0], said, where[1]))
    text = "%s sent an unexpected reply to %s: %s" % (where[0], where[1], said)
    return _Reason(451, "4.5.0", text)


# --- how our texts name a hop and a failure ------------------------------------------------------


def _hostport(hop):
    address = "[%s]" % hop.address if ":" in hop.address else hop.address
    return "%s:%d" % (address, hop.port)


def _label(hop):
    """How a hop is named in our texts: 127.0.0.1:25, or mx.example.com (192.0.2.1:25)."""
    if hop.name and hop.name != hop.address:
        return "%s (%s)" % (hop.name, _hostport(hop))
    return _hostport(hop)


def _describe(reason):
    value = reason.value if isinstance(reason, failure.Failure) else reason
    text = str(value) or value.__class__.__name__
    return text.replace("\n", " ")


# --- per-recipient results -----------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class _Outcome:
    """What one connection decided: final results, results to retry at the next hop."""

    final = attr.ib()
    retry = attr.ib()
    tls_failed = attr.ib(default=False)
    stale = attr.ib(default=False)  # a cached connection found closed: try a new one at once


def session_result(recipient, outcome, reason, hop, tls, session, dsn=False):
    """A recipient's RecipientResult from a reply in an SMTP session with hop."""
    return RecipientResult(
        recipient, outcome, reason.code, reason.status, reason.text,
        remote=hop, tls=tls, session=session, dsn=dsn,
    )


def transaction_results(recipients, addresses, code, resp, where, result):
    """
    Combine the RCPT replies ((address, code, resp) in the order sent) with the reply to DATA
    or to the final dot (or, when nobody was accepted, nothing) -> (final, retry), each
    {recipient: result(recipient, outcome, reason)}.  A 4xx RCPT reply while others were
    accepted is final for this attempt (deferred, no failover); when nobody was accepted the
    4xx ones are retried at the next hop and the 5xx ones bounce.
    """
    final, retry, accepted = {}, {}, []
    rcpt_temporary = {}
    for recipient, (_, rcode, rresp) in zip(recipients, addresses):
        reason = parse_reply(rcode, rresp)
        if rcode in smtp.SUCCESS:
            accepted.append(recipient)
        elif 500 <= rcode < 600:
            final[recipient] = result(recipient, "bounced", reason)
        else:
            rcpt_temporary[recipient] = result(recipient, "deferred", reason)
    if not accepted:
        retry.update(rcpt_temporary)  # nobody accepted here: the next hop may
    else:
        final.update(rcpt_temporary)
        reason = parse_reply(code, resp)
        if code in smtp.SUCCESS:
            outcome = "delivered"
        elif 500 <= code < 600:
            outcome = "bounced"
        else:
            outcome = None
            reason = _temporary(reason, where)
        for recipient in accepted:
            if outcome:
                final[recipient] = result(recipient, outcome, reason)
            else:
                retry[recipient] = result(recipient, "deferred", reason)
    return final, retry


def _hop_failure(recipients, reason, remote=None):
    retry = {
        r: RecipientResult(r, "deferred", reason.code, reason.status, reason.text, remote=remote)
        for r in recipients
    }
    return _Outcome({}, retry)


def _own(recipient, outcome, reason):
    return RecipientResult(recipient, outcome, reason.code, reason.status, reason.text)


def _first(outcome):
    for result in list(outcome.retry.values()) + list(outcome.final.values()):
        return result
    return _Reason(451, "4.7.5", "TLS failure")
