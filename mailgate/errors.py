"""
Exceptions that carry what the user must be told.

A ReplyError carries the exact SMTP reply it stands for, so whoever catches it answers the client
without guessing.  A ConfigError names the file, section and key, so start-up can print one line.
"""

import attr


class ReplyError(Exception):
    """Raised where a check fails with a definite SMTP reply (a mailgate.envelope.Reply)."""

    def __init__(self, reply, reason=None):
        Exception.__init__(self, reply, reason)
        self.reply = reply
        self.reason = reason

    def __str__(self):
        return str(self.reply)


@attr.s(auto_exc=True, str=False)
class ConfigError(Exception):
    """
    A configuration problem, rendered as one line: FILE: [SECTION] KEY: MESSAGE.

    section and key are None when the problem is with the file as a whole (or a whole section).
    """

    file = attr.ib()
    section = attr.ib()
    key = attr.ib()
    message = attr.ib()

    def __str__(self):
        where = str(self.file)
        if self.section is not None:
            where += ": [%s]" % (self.section,)
            if self.key is not None:
                where += " %s" % (self.key,)
        return "%s: %s" % (where, self.message)


class RoutingError(Exception):
    """
    No next hop for a destination.  permanent: bounce (e.g. null MX, 5.1.10; mail loop, 5.4.6);
    else defer (DNS timeout, 4.4.3).  status is the RFC 3463 code, text the diagnostic.
    """

    def __init__(self, status, text, permanent):
        Exception.__init__(self, status, text, permanent)
        self.status = status
        self.text = text
        self.permanent = permanent

    def __str__(self):
        return "%s %s" % (self.status, self.text)


class QueueUnavailable(Exception):
    """
    The queue's storage cannot be reached right now (a database down or failing over): the
    client is told 451 4.3.0 and tries again; nothing was stored.  str: one line, why.
    """
