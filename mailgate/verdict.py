"""
What a filter says about a session or a message.  Filters never answer the client or edit the
message themselves: they return a Verdict and the chain decides (first reject or tempfail wins).

This module is public API for third-party filters.
"""

import attr

from mailgate.envelope import Reply

ACTIONS = ("next", "accept", "reject", "tempfail", "quarantine")


def _check_reply(verdict):
    if verdict.action == "reject" and not 500 <= verdict.reply.code < 600:
        raise ValueError("Verdict.reject needs a 5xx code, got %d" % verdict.reply.code)
    if verdict.action == "tempfail" and not 400 <= verdict.reply.code < 500:
        raise ValueError("Verdict.tempfail needs a 4xx code, got %d" % verdict.reply.code)
    if verdict.reply is not None and not verdict.reply.status.startswith(str(verdict.reply.code)[0] + "."):
        raise ValueError("enhanced status %r does not match code %d" % (verdict.reply.status, verdict.reply.code))


@attr.s(frozen=True, slots=True)
class Verdict:
    """
    action: "next" (go on to the next filter), "accept" (skip the remaining filters of this
    stage), "reject" / "tempfail" (end the chain with reply), "quarantine" (accept, but keep the
    message in the quarantine area).  headers are added to the message; message replaces it.
    """

    action = attr.ib(validator=attr.validators.in_(ACTIONS))
    reply = attr.ib(default=None)
    reason = attr.ib(default=None)
    headers = attr.ib(default=(), converter=tuple)
    message = attr.ib(default=None)  # an email.message.EmailMessage replacing the message

    def __attrs_post_init__(self):
        _check_reply(self)

    @classmethod
    def next(cls):
        return cls("next")

    @classmethod
    def accept(cls):
        return cls("accept")

    @classmethod
    def reject(cls, code, status, text):
        return cls("reject", reply=Reply(code, status, text), reason=text)

    @classmethod
    def tempfail(cls, code, status, text):
        return cls("tempfail", reply=Reply(code, status, text), reason=text)

    @classmethod
    def quarantine(cls, reason):
        return cls("quarantine", reason=reason)

    def with_headers(self, headers):
        """The same verdict adding headers, a list of (name, value) pairs."""
        return attr.evolve(self, headers=self.headers + tuple((str(n), str(v)) for n, v in headers))

    def with_message(self, message):
        """The same verdict replacing the message (e.g. with an attachment stripped)."""
        return attr.evolve(self, message=message)

    @property
    def ends_chain(self):
        return self.action in ("reject", "tempfail")


@attr.s(frozen=True, slots=True)
class AuthResult:
    """
    One RFC 8601 result for the Authentication-Results header: method ("spf", "dkim", "dmarc"),
    result ("pass", "fail", ...), an optional reason, and properties as (ptype.property, value)
    pairs, e.g. ("smtp.mailfrom", "example.com") or ("header.d", "example.com").
    """

    method = attr.ib()
    result = attr.ib()
    reason = attr.ib(default=None)
    properties = attr.ib(default=(), converter=tuple)


@attr.s(frozen=True, slots=True)
class DataResult:
    """
    The chain's answer at end of data when the message is accepted: the message bytes to queue
    (without our Received header, which the listener adds), the queue state ("active" or
    "quarantine") and the verdicts given, as ("filter", "action") pairs, for tracking.
    """

    data = attr.ib()
    state = attr.ib(default="active")
    verdicts = attr.ib(default=(), converter=tuple)
    reason = attr.ib(default=None)
