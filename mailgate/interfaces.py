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
        """Durably remove one entry (delivered, bounced or deleted)."""


class IAuthBackend(Interface):
    """Checks SMTP AUTH credentials and says which senders a user may use."""

    def authenticate(username, password):
        """Fires with an IUser when the credentials are right, None when they are not."""


class IUser(Interface):
    name = Attribute("The username (str) as given to AUTH")

    def may_send_as(address):
        """True when the user may use address (str, possibly "") as MAIL FROM."""
