"""
The seams a user may plug into.  Each method returns a Deferred so that an implementation may do
I/O (a database, a remote service) without blocking the reactor.
"""

from zope.interface import Attribute, Interface


class IQueue(Interface):
    """
    Where accepted messages live until delivered.  Every message is in one state at a time:
    "active" (waiting for delivery), "deferred", "hold", "quarantine".
    """

    def recover():
        """
        Called once before the first enqueue: clean up anything a crash left half-written.
        Fires with the number of entries removed.
        """

    def enqueue(envelope, data, state="active"):
        """
        Store envelope (mailgate.envelope.Envelope) and the message bytes data durably.  Fires
        (with the queue id) only once both survive a crash; errbacks when they may not have.
        """

    def load(queue_id):
        """Fires with (state, envelope, data) of one entry; KeyError when there is none."""

    def list(state=None):
        """Fires with a list of (state, envelope) of all entries, or of those in state."""

    def move(queue_id, state):
        """Durably move one entry to another state."""

    def remove(queue_id):
        """
        Durably remove one entry (delivered, bounced or deleted), and then its delivery state: in
        that order, so that a crash can leave a state without a message but never the reverse.
        """

    def save_state(queue_id, data):
        """
        Durably replace the delivery state (opaque bytes owned by the scheduler: which recipients
        are done, when to retry) of an existing entry, so that a restart never repeats a delivery
        already recorded.  Fires once the new bytes survive a crash; a crash before that leaves the
        old bytes or the new ones, never a mix.  KeyError when the entry does not exist.
        """

    def load_state(queue_id):
        """
        Fires with the bytes last saved by save_state for queue_id, or None when none were (a new
        entry): what a scheduler resumes from after a restart.
        """

    def subscribe(callback):
        """
        Call callback(queue_id, state) on the reactor thread each time enqueue() or move() has
        durably committed an entry into state, so that a scheduler hears of new work at once
        instead of polling list().  Errors raised by callback are logged and never reach the caller
        of enqueue() or move().  Returns a function that unsubscribes.
        """


class IAuthBackend(Interface):
    """Checks SMTP AUTH credentials and says which senders a user may use."""

    def authenticate(username, password):
        """Fires with an IUser when the credentials are right, None when they are not."""


class IRecipientValidator(Interface):
    """Says at RCPT time whether an address of an accepted domain exists (a listener's recipients)."""

    def check(address):
        """
        address: a mailgate.envelope.Address of an accepted domain.  Fires with None when it is
        known, or with the Reply refusing it (550 5.1.1); errbacks when the answer cannot be had
        now (the client is told 451 4.4.3, never a rejection).
        """


class IUser(Interface):
    name = Attribute("The username (str) as given to AUTH")

    def may_send_as(address):
        """True when the user may use address (str, possibly "") as MAIL FROM."""


class IFilter(Interface):
    """
    A step of the filter chain (public API for third-party filters).  A filter provides name and
    any of the hooks below; each returns a mailgate.verdict.Verdict, or a Deferred firing with
    one.  A hook that raises or does not answer within [filters] timeout gives 451 4.3.0.

    session (mailgate.session.Session) exposes: id, client_ip, client_port, helo, tls (bool),
    tls_version, tls_cipher, user (authenticated name or None), listener (name), relay_allowed
    (authenticated or in relay_ips), sender and recipients (the transaction so far) and
    transaction, a dict shared by the filters for the current transaction (cleared on RSET and
    after each message).  message (mailgate.message.Message) has envelope, raw and parsed.
    """

    name = Attribute("The filter's name, used in logs and verdict records")

    def on_connect(session):
        """A client connected (before the banner)."""

    def on_helo(session):
        """The client said EHLO or HELO (session.helo)."""

    def on_mail(session, sender):
        """MAIL FROM: sender is a mailgate.envelope.Address (null sender: local == domain == "")."""

    def on_rcpt(session, recipient):
        """RCPT TO: recipient is a mailgate.envelope.Address."""

    def on_data(session, message):
        """End of data: message is a mailgate.message.Message."""
