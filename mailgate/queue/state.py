"""
The delivery state of one queued message: which recipients are done and how, how many rounds
were tried, when the next one is due, and the DKIM signatures made for it.

The scheduler (mailgate.delivery.scheduler) owns what the values mean; the queue owns how they
are kept, which is why the format lives here.  to_bytes() is what every backend is given by
IQueue.save_state: the spool keeps those bytes whole (state/<id>), the PostgreSQL backend splits
them into a row per recipient and a few columns of the message's row (next_attempt among them,
which is how the database knows what is due).  The JSON keys are the attribute names.
"""

import json

import attr

from mailgate.envelope import RecipientResult

OUTCOMES = ("pending", "deferred", "delivered", "bounced")
RECIPIENT_FIELDS = ("outcome", "code", "status", "text", "remote", "at", "reported")


@attr.s(frozen=True)
class Remote:
    """Enough of a Hop for bounce.make_dsn (it only reports the name)."""

    name = attr.ib()
    address = attr.ib(default=None)
    port = attr.ib(default=None)


@attr.s
class DeliveryState:
    """What the queue keeps for one message besides its envelope and body (JSON)."""

    recipients = attr.ib()  # {address: {"outcome", "code", "status", "text", "remote", "at", "reported"}}
    attempts = attr.ib(default=0)  # completed delivery rounds
    next_attempt = attr.ib(default=0.0)
    delay_warned = attr.ib(default=False)
    dkim = attr.ib(factory=dict)  # route name -> DKIM-Signature header (str), made once

    @classmethod
    def new(cls, envelope):
        return cls(recipients={r: {"outcome": "pending"} for r in envelope.recipients})

    @classmethod
    def from_bytes(cls, data, envelope):
        if data is None:
            return cls.new(envelope)
        fields = json.loads(data.decode("utf-8"))
        return cls(**{a.name: fields[a.name] for a in attr.fields(cls) if a.name in fields})

    def to_bytes(self):
        return json.dumps(attr.asdict(self), sort_keys=True).encode("utf-8")

    def pending(self):
        return [r for r, s in self.recipients.items() if s["outcome"] in ("pending", "deferred")]

    def record(self, result, now):
        self.recipients[result.recipient] = {
            "outcome": result.outcome, "code": result.code, "status": result.status,
            "text": result.text, "remote": result.remote.name if result.remote else None,
            "at": now, "reported": False, "dsn": bool(result.dsn)}

    def unreported(self, outcome):
        return [r for r, s in self.recipients.items() if s["outcome"] == outcome and not s.get("reported")]

    def as_result(self, recipient):
        s = self.recipients[recipient]
        remote = Remote(s["remote"]) if s.get("remote") else None
        return RecipientResult(recipient, s["outcome"], s.get("code") or 0, s.get("status") or "",
                               s.get("text") or "", remote), s.get("at") or 0.0
