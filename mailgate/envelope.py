"""
Values that flow between the listener, the queue and (later) delivery.

They are frozen: a stage that needs to change one makes a new one with attr.evolve.  The envelope is
stored as JSON next to the message, never pickled, so a queue entry is readable by humans and by any
version of mailgate.
"""

import json

import attr


@attr.s(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a code, an RFC 3463 enhanced status (or "" for 220/221 style replies), text."""

    code = attr.ib(converter=int)
    status = attr.ib()
    text = attr.ib()

    @property
    def is_positive(self):
        return self.code < 400

    @property
    def is_temporary(self):
        return 400 <= self.code < 500

    def lines(self):
        """The reply as the bytes lines to send (multi-line text becomes a multi-line reply)."""
        texts = self.text.split("\n") if self.text else [""]
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            # "334 " keeps its space: an empty SASL challenge is still "code SP" (RFC 4954 4).
            words = [w for w in (self.status, text) if w]
            line = "%03d%s%s" % (self.code, sep, " ".join(words))
            out.append(line.encode("utf-8", "replace"))
        return out

    def __str__(self):
        return b"\r\n".join(self.lines()).decode("utf-8", "replace")


@attr.s(frozen=True, slots=True)
class Address:
    """
    A parsed RFC 5321 path.  local is the local part as written (quotes removed only where the
    quoting was unnecessary), domain is lower-cased (an address literal keeps its brackets).  The
    null reverse-path <> has local == domain == "".
    """

    local = attr.ib()
    domain = attr.ib()

    @property
    def is_null(self):
        return not self.local and not self.domain

    def __str__(self):
        if self.is_null:
            return ""
        return "%s@%s" % (self.local, self.domain)


@attr.s(frozen=True, slots=True)
class Envelope:
    """
    Everything known about a message besides its bytes, as stored in the queue before the 250.

    sender is "" for the null reverse-path; recipients are plain addresses (str).  received_at is
    a POSIX timestamp.  tls_version and tls_cipher are None on a plaintext session; user is None
    when the client did not authenticate.
    """

    queue_id = attr.ib()
    sender = attr.ib()
    recipients = attr.ib(converter=tuple)
    client_ip = attr.ib()
    client_port = attr.ib(default=0)
    helo = attr.ib(default="")
    listener = attr.ib(default="")
    user = attr.ib(default=None)
    tls_version = attr.ib(default=None)
    tls_cipher = attr.ib(default=None)
    protocol = attr.ib(default="ESMTP")
    received_at = attr.ib(default=0.0)
    size = attr.ib(default=0)
    body = attr.ib(default="7BIT")
    verdicts = attr.ib(default=(), converter=lambda v: tuple(tuple(x) for x in v))  # (filter, action)
    # SMTPUTF8 (RFC 6531): the client asked for it; addresses and headers may be UTF-8.
    smtputf8 = attr.ib(default=False)
    # DSN (RFC 3461): RET ("FULL", "HDRS" or None), ENVID (decoded text or None), and per
    # recipient (recipient, NOTIFY words or None when not given, ORCPT "type;address" or None).
    ret = attr.ib(default=None)
    envid = attr.ib(default=None)
    dsn = attr.ib(default=(), converter=lambda v: tuple(
        (r, tuple(n) if n is not None else None, o) for r, n, o in v))

    def notify(self, recipient):
        """The NOTIFY words for recipient; without NOTIFY, RFC 3461's default FAILURE, DELAY."""
        for r, notify, _ in self.dsn:
            if r == recipient and notify is not None:
                return notify
        return ("FAILURE", "DELAY")

    def notify_given(self, recipient):
        """Whether the client said NOTIFY for recipient (then the next hop is told it too)."""
        return any(r == recipient and n is not None for r, n, _ in self.dsn)

    def orcpt(self, recipient):
        for r, _, orcpt in self.dsn:
            if r == recipient:
                return orcpt
        return None

    def to_json(self):
        return json.dumps(attr.asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data):
        fields = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
        known = {a.name for a in attr.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


@attr.s(frozen=True, slots=True)
class Hop:
    """One place to try delivering to: the host's name (for TLS checks and logs), an IP, a port."""

    name = attr.ib()
    address = attr.ib()
    port = attr.ib(converter=int)


@attr.s(frozen=True, slots=True)
class RecipientResult:
    """
    What one delivery attempt did for one recipient.  outcome is "delivered", "deferred" (try
    again later) or "bounced" (permanent).  code/status/text are the remote's reply, or ours
    (e.g. 451 4.4.1 for a connection failure).  remote is the Hop that answered, if any; tls
    the TLS version used, None for plaintext.
    """

    recipient = attr.ib()
    outcome = attr.ib()
    code = attr.ib(converter=int)
    status = attr.ib()
    text = attr.ib()
    remote = attr.ib(default=None)
    tls = attr.ib(default=None)
    session = attr.ib(default=None)  # id of the outbound SMTP session that gave the reply, if any
    dsn = attr.ib(default=False)  # the hop offered DSN: delivery notices are its business now

    @property
    def final(self):
        return self.outcome in ("delivered", "bounced")
