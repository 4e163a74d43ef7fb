"""
The message as filters see it at end of data (public API for third-party filters).
"""

import attr


@attr.s(frozen=True, slots=True)
class Message:
    """
    envelope: the mailgate.envelope.Envelope (queue_id, sender, recipients, client, ...);
    raw: the message bytes as received (CRLF line ends, without our Received header);
    parsed: the same message as an email.message.EmailMessage (email.policy.default).
    """

    envelope = attr.ib()
    raw = attr.ib()
    parsed = attr.ib()

    @property
    def queue_id(self):
        return self.envelope.queue_id
