"""
The Received: trace header we put at the top of every stored message (RFC 5321 4.4).

Built only from values the listener has already validated (the EHLO name, the client's
address, our hostname, the queue id), so nothing a client sends can inject a header line.
"""

import datetime
import email.utils


def _rfc5322_date(ts):
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(ts, datetime.timezone.utc))


def received_header(envelope, hostname):
    """The header for envelope (mailgate.envelope.Envelope), as CRLF-terminated bytes."""
    ip = envelope.client_ip
    literal = "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip
    lines = ["Received: from %s (%s)" % (envelope.helo, literal)]
    if envelope.tls_version:
        lines.append("\t(using %s with cipher %s)" % (envelope.tls_version, envelope.tls_cipher))
    lines.append("\tby %s (mailgate) with %s id %s" % (hostname, envelope.protocol, envelope.queue_id))
    when = _rfc5322_date(envelope.received_at)
    if len(envelope.recipients) == 1:
        lines.append("\tfor <%s>; %s" % (envelope.recipients[0], when))
    else:
        lines[-1] += ";"
        lines.append("\t" + when)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
