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
        Fires with the number of entries removed.  A receiver process (mailgate.processes), which
        only enqueues into a queue the main process recovered, calls the backend's open() instead
        when it has one (a database backend connects there), and close() on stop.
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

    def move(queue_id, state, claim=None):
        """
        Durably move one entry to another state.  With claim (the scheduler's, see IWorkSource):
        only while that claim is held and the entry is still deliverable (active or deferred);
        else LeaseLost and nothing moves, so that a hold made elsewhere is never undone.
        """

    def remove(queue_id, claim=None):
        """
        Durably remove one entry (delivered, bounced or deleted), and then its delivery state: in
        that order, so that a crash can leave a state without a message but never the reverse.
        With claim: only while it is held (else LeaseLost).  Without: any claim on it ends.
        """

    def save_state(queue_id, data, claim=None):
        """
        Durably replace the delivery state (mailgate.queue.state.DeliveryState.to_bytes(): which
        recipients are done, when to retry) of an existing entry, so that a restart never repeats
        a delivery already recorded.  Fires once the new state survives a crash; a crash before
        that leaves the old state or the new one, never a mix.  KeyError when the entry does not
        exist; with claim, LeaseLost (nothing saved) when the claim is no longer held.
        """

    def load_state(queue_id):
        """
        Fires with the bytes last saved by save_state for queue_id, or None when none were (a new
        entry): what a scheduler resumes from after a restart.
        """

    def load_with_state(queue_id):
        """
        Fires with (state, envelope, data, delivery state bytes or None): load() and load_state()
        in one read, which is what the scheduler needs for each delivery round (one thread job or
        database round trip a message instead of two).  KeyError when there is no entry.
        """

    def subscribe(callback):
        """
        Call callback(queue_id, state) on the reactor thread each time enqueue() or move() in this
        process has durably committed an entry into state, so that a scheduler hears of new work
        at once instead of polling list().  Errors raised by callback are logged and never reach
        the caller of enqueue() or move().  Returns a function that unsubscribes.  (Work added by
        other processes is announced by IWorkSource.on_due.)
        """

    def check_writable():
        """
        Can the queue take a message right now?  Fires True, or False or a str saying why not
        (a full disk, an unreachable database): what /healthz reports.
        """


class IWorkSource(Interface):
    """
    Which process delivers what: the scheduler delivers a message only while it holds a claim on
    it (a mailgate.queue.claims.Claim), and hands that claim to every save_state, move and remove
    it does for the message.  A queue used by one process implements this trivially (claims in
    memory, mailgate.queue.claims.LocalClaims); a queue shared by several nodes or processes
    keeps the claims as leases that run out unless renewed, so that the work of a process that
    died is taken over by the others.  Every method returns a Deferred.
    """

    lease = Attribute("Seconds a claim lasts unless renewed, or None: claims last until released")
    poll_interval = Attribute("Seconds between claim_due sweeps when nothing announces work")

    def claim(queue_id):
        """
        Claim one message for this process: fires with a Claim, or None when another holds it.
        Its state is not checked (the scheduler loads the message and decides).
        """

    def claim_due(now, limit):
        """
        Claim, in one atomic step, up to limit deliverable messages (active, or deferred with
        their next attempt at or before now) that nobody holds, oldest first.  Fires with a Due:
        the claims, and when the earliest deliverable message not yet due will be (or None).
        """

    def renew(claims):
        """Extend claims (a list) for another lease; fires with the queue ids of those lost."""

    def release(claim):
        """Give a claim up (the round is over): the message may be claimed again at once."""

    def make_due(queue_ids, now):
        """Make these messages due now (a flush) and tell the other processes at once."""

    def on_due(callback):
        """
        Call callback() on the reactor thread when another process says work may be due (new
        mail, a release, a flush), so that claim_due runs at once instead of at the next poll.
        Returns a function that unsubscribes.
        """

    def holders(queue_ids):
        """Fires with {queue_id: (owner, until or None)} for the ones claimed now."""


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
