"""
The listener's reply catalogue: every fixed answer the SMTP server gives, in one place.

Replies are part of the contract (the README's "SMTP behaviour" table lists them), so they are
named values rather than strings scattered through the protocol; each carries its RFC 3463
enhanced status.  Replies that name our hostname are functions of it.
"""

from mailgate.envelope import Reply as R

OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Ok")
RECIPIENT_OK = R(250, "2.1.5", "Ok")
TLS_FIRST = R(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_FIRST = R(530, "5.7.0", "Authentication required")
BAD_SEQUENCE_HELO = R(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command")
NESTED_MAIL = R(503, "5.5.1", "Nested MAIL command")
NO_RCPT = R(554, "5.5.1", "No valid recipients")
TOO_MANY_RCPTS = R(452, "4.5.3", "Too many recipients")
TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed limit")
BARE_NEWLINE = R(550, "5.6.0", "Message contains bare CR or LF characters")
LONG_LINE = R(554, "5.6.0", "Message contains a line longer than 998 characters")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")
BAD_CHAR = R(501, "5.5.4", "Invalid character in command")
UNKNOWN = R(500, "5.5.2", "Command not recognized")
TEMP_FAIL = R(451, "4.3.0", "Temporary failure, please try again later")
DATA_SYNTAX = R(501, "5.5.4", "Syntax: DATA")
START_DATA = R(354, "", "End data with <CR><LF>.<CR><LF>")

STARTTLS_SYNTAX = R(501, "5.5.4", "Syntax: STARTTLS")
TLS_ACTIVE = R(503, "5.5.1", "TLS already active")
NO_STARTTLS = R(502, "5.5.1", "STARTTLS not available")
START_TLS = R(220, "2.0.0", "Ready to start TLS")

AUTH_OK = R(235, "2.7.0", "Authentication successful")
AUTH_BAD = R(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = R(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TEMP = R(454, "4.7.0", "Temporary authentication failure")
AUTH_DISABLED = R(503, "5.5.1", "Authentication not enabled")
AUTH_NEEDS_EHLO = R(503, "5.5.1", "Send EHLO first")
AUTH_AGAIN = R(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = R(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_MECHANISM = R(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = R(501, "5.7.0", "Authentication cancelled")
AUTH_UNDECODABLE = R(501, "5.5.2", "Cannot decode response")

# The limits across sessions (mailgate.smtp.limits).
AUTH_BLOCKED = R(454, "4.7.0", "Too many failed authentications, try later")
PROTOCOL_ERROR = R(554, "5.5.0", "Protocol error")  # talking before the banner
TOO_MANY_HOPS = R(554, "5.4.6", "Too many hops (mail loop)")

VRFY = R(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
NO_EXPN = R(502, "5.5.1", "EXPN not available")
HELP = R(214, "2.0.0", "mailgate: see RFC 5321")
BYE = R(221, "2.0.0", "Bye")


def queued(queue_id):
    return R(250, "2.0.0", "Ok: queued as %s" % (queue_id,))


def unavailable(hostname):
    return R(421, "4.3.0", "%s Service not available, try again later" % (hostname,))


def timed_out(hostname, why):
    return R(421, "4.4.2", "%s Error: %s" % (hostname, why))


def too_many_errors(hostname):
    return R(421, "4.7.0", "%s Error: too many errors" % (hostname,))


def too_many_auth_failures(hostname):
    return R(421, "4.7.0", "%s Error: too many authentication failures" % (hostname,))


def temporary_greeting(hostname, reply):
    """RFC 5321 3.1: the only temporary greeting is 421 (then close)."""
    return R(421, reply.status, "%s %s" % (hostname, reply.text))


def too_many_connections(hostname):
    return R(421, "4.7.0", "%s Too many connections" % (hostname,))


def connection_rate(hostname, ip):
    return R(421, "4.7.0", "%s Too many connections from %s, try again later" % (hostname, ip))


def message_rate(who):
    return R(450, "4.7.1", "Too much mail from %s, try again later" % (who,))


def recipient_rate(who):
    return R(450, "4.7.1", "Too many recipients from %s, try again later" % (who,))


def data_too_slow(hostname):
    return R(421, "4.4.2", "%s Error: data rate below the minimum" % (hostname,))
