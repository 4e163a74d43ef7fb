"""
SMTP AUTH's SASL exchanges (RFC 4954): PLAIN and LOGIN, and the credential check.

Kept apart from the protocol so that the state machine only asks "what do I send next?": an
Exchange is fed the client's decoded responses and answers with a challenge to send (str,
base64 already) or the (username, password) pair once complete.  Malformed input raises
ReplyError with the reply to give.  Where the session counts failures and closes is the
protocol's business (mailgate.smtp.server).
"""

import base64
import binascii

from twisted.internet import defer

from mailgate.errors import ReplyError
from mailgate.smtp import replies

MECHANISMS = ("PLAIN", "LOGIN")  # as advertised, PLAIN preferred


def _initial(initial):
    """An AUTH command's initial response: None (absent), b"" ("="), or the decoded bytes."""
    if initial is None:
        return None
    if initial == "=":
        return b""
    try:
        return base64.b64decode(initial.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ReplyError(replies.AUTH_UNDECODABLE)


def _plain(initial):
    value = _initial(initial)
    if value is None:
        value = yield ""
    parts = value.split(b"\x00")
    if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
        raise ReplyError(replies.AUTH_BAD)
    yield (parts[1], parts[2])


def _login(initial):
    username = _initial(initial)
    if username is None:
        username = yield "VXNlcm5hbWU6"
    password = yield "UGFzc3dvcmQ6"
    yield (username, password)


_STEPS = {"PLAIN": _plain, "LOGIN": _login}


class Exchange:
    """One AUTH exchange: start() and each feed() give a challenge (str) or (user, password)."""

    def __init__(self, mechanism, initial):
        """mechanism: upper case; initial: the AUTH command's initial response or None."""
        steps = _STEPS.get(mechanism)
        if steps is None:
            raise ReplyError(replies.AUTH_MECHANISM)
        self._steps = steps(initial)

    def start(self):
        return self._steps.send(None)

    def feed(self, line):
        """The client's next response line (bytes): "*" cancels, anything else is base64."""
        if line == b"*":
            raise ReplyError(replies.AUTH_CANCELLED)
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise ReplyError(replies.AUTH_UNDECODABLE)
        return self._steps.send(decoded)


def authenticate(backend, username, password):
    """
    Deferred firing with (username str, IUser or None) for the raw credentials; a username or
    password that is not UTF-8 is a failed login, never a call to the backend.  Errbacks when
    the backend fails (a temporary failure, not a wrong password).
    """
    try:
        username, password = username.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        return defer.succeed((username.decode("latin-1", "replace"), None))
    d = defer.maybeDeferred(backend.authenticate, username, password)
    return d.addCallback(lambda user: (username, user))
