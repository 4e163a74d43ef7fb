"""
What one outbound transaction says beyond MAIL FROM:<> and RCPT TO:<>: the ESMTP extensions
negotiated with the next hop, from its EHLO reply and what the message needs.

    transfer = Transfer.of(envelope)                     # the scheduler, per message
    plan = plan_transaction(ehlo_items, transfer, sender, recipients, data, chunking=True)
    plan.refused      # {recipient: _Reason}: cannot go to this hop at all (bounced)
    plan.mail         # b"MAIL FROM:<...> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=..."
    plan.rcpt(r)      # b"RCPT TO:<...> NOTIFY=... ORCPT=..."
    plan.chunking     # send with BDAT instead of DATA

- 8BITMIME (RFC 6152): a message holding 8-bit octets goes with BODY=8BITMIME to a hop that
  offers it; to a hop that does not, it is not sent (554 5.6.3, bounced: mailgate does not
  convert to quoted-printable, which would break DKIM signatures and S/MIME).
- SMTPUTF8 (RFC 6531): a transaction with a non-ASCII address goes with SMTPUTF8 to a hop that
  offers it; otherwise domains go in A-label form, and a recipient whose local part is not
  ASCII is bounced (553 5.6.7), every recipient when the sender's is not.  A message the client
  sent with SMTPUTF8 but whose envelope is ASCII goes without it.
- DSN (RFC 3461): to a hop that offers DSN, RET and ENVID on MAIL, the client's NOTIFY and an
  ORCPT (the client's, else the recipient as received) on RCPT; plan.dsn tells the scheduler
  that the hop took over the notifications (no "relayed" notice from us).
- CHUNKING (RFC 3030): BDAT when the hop offers it and [delivery] chunking is on.
"""

import re

import attr

from mailgate.delivery.outcome import _Reason, _label
from mailgate.idn import ascii_address
from mailgate.smtp.params import orcpt_for_next_hop, xtext_encode

_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


@attr.s(frozen=True, slots=True)
class Transfer:
    """What the envelope asks of the next hop (defaults: a plain 7-bit ASCII message)."""

    smtputf8 = attr.ib(default=False)
    ret = attr.ib(default=None)
    envid = attr.ib(default=None)
    notify = attr.ib(factory=dict)  # recipient -> NOTIFY words, when the client gave them
    orcpt = attr.ib(factory=dict)  # recipient -> "type;address", when the client gave one

    @classmethod
    def of(cls, envelope):
        notify = {r: n for r, n, _ in envelope.dsn if n is not None}
        orcpt = {r: o for r, _, o in envelope.dsn if o is not None}
        return cls(bool(envelope.smtputf8), envelope.ret, envelope.envid, notify, orcpt)


@attr.s(frozen=True, slots=True)
class Plan:
    mail = attr.ib()  # the MAIL command (bytes)
    rcpts = attr.ib()  # recipient -> the RCPT command (bytes), in order, without the refused
    refused = attr.ib()  # recipient -> _Reason
    chunking = attr.ib(default=False)
    dsn = attr.ib(default=False)  # the hop offers DSN: NOTIFY went with the recipients

    def rcpt(self, recipient):
        return self.rcpts[recipient]


def eight_bit(data):
    return _EIGHT_BIT.search(data) is not None


def plan_transaction(items, transfer, sender, recipients, data, hop, chunking=True):
    """
    items: the hop's EHLO keywords (upper-case bytes -> parameter bytes or None; {} after
    HELO).  The Plan for sending sender and recipients with data (bytes) to hop.
    """
    transfer = transfer or Transfer()
    offers = {key.decode("ascii", "replace").upper() for key in items}
    utf8 = "SMTPUTF8" in offers
    dsn = "DSN" in offers
    refused = {}
    eight = eight_bit(data)
    if eight and "8BITMIME" not in offers:
        reason = _Reason(554, "5.6.3", "%s does not offer 8BITMIME and the message holds 8-bit "
                         "data: conversion to 7 bits is not done, so it cannot be sent there"
                         % _label(hop))
        return Plan(b"", {}, {r: reason for r in recipients})
    wire_sender = sender
    needs_utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
    if needs_utf8 and not utf8:
        wire_sender = ascii_address(sender)
        if wire_sender is None:
            reason = _Reason(550, "5.6.7", "%s does not offer SMTPUTF8, needed for the "
                             "non-ASCII sender <%s>" % (_label(hop), sender))
            return Plan(b"", {}, {r: reason for r in recipients})
    params = []
    if eight:
        params.append(b"BODY=8BITMIME")
    if utf8 and (needs_utf8 or transfer.smtputf8):
        params.append(b"SMTPUTF8")
    if dsn:
        if transfer.ret:
            params.append(b"RET=" + transfer.ret.encode("ascii"))
        if transfer.envid:
            params.append(b"ENVID=" + xtext_encode(transfer.envid).encode("ascii"))
    mail = b"MAIL FROM:<" + wire_sender.encode("utf-8") + b">" + b"".join(b" " + p for p in params)
    rcpts = {}
    for recipient in recipients:
        wire = recipient if utf8 or recipient.isascii() else ascii_address(recipient)
        if wire is None:
            refused[recipient] = _Reason(553, "5.6.7", "%s does not offer SMTPUTF8, needed for "
                                         "the non-ASCII recipient <%s>" % (_label(hop), recipient))
            continue
        line = b"RCPT TO:<" + wire.encode("utf-8") + b">"
        if dsn:
            notify = transfer.notify.get(recipient)
            if notify:
                line += b" NOTIFY=" + ",".join(notify).encode("ascii")
            orcpt = orcpt_for_next_hop(transfer.orcpt.get(recipient), recipient)
            if orcpt:
                line += b" ORCPT=" + orcpt.encode("ascii")
        rcpts[recipient] = line
    return Plan(mail, rcpts, refused, chunking="CHUNKING" in offers and chunking, dsn=dsn)
