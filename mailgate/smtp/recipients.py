"""
Recipient validation at RCPT (a listener's `recipients = ldap`): the step between the relay
check and the filters, so that no mail for an unknown user is ever queued.

Only addresses of an accepted domain are asked about (mail the client may relay elsewhere is
not ours to know); postmaster (RFC 5321 4.5.1) never is, it is always accepted.  The validator (an
IRecipientValidator, mailgate.directory for LDAP) answers None or the refusal; when it cannot
answer, the client is told 451 4.4.3 and tries again later: a directory that is down or slow
never turns into a 5xx, and never into an accept.
"""

from twisted.internet import defer
from twisted.logger import Logger

from mailgate.envelope import Reply
from mailgate.smtp import policy

log = Logger()


def unavailable(address):
    return Reply(451, "4.4.3", "<%s>: Recipient address rejected: Directory temporarily "
                               "unavailable, try again later" % (address,))


def check(factory, address):
    """Deferred[None or the refusing Reply] for RCPT TO:<address>; it never errbacks."""
    validator = getattr(factory, "recipients", None)
    if (validator is None or factory.listener.recipients == "any" or not address.domain
            or address.local.lower() == "postmaster"  # RFC 5321 4.5.1: always accepted
            or not policy.is_local(factory.gateway, address)):
        return defer.succeed(None)
    d = defer.maybeDeferred(validator.check, address)

    def unsure(failure):
        log.warn("cannot validate recipient <{address}> on {listener}: {error}; answered "
                 "451 4.4.3", address=str(address), listener=factory.listener.name,
                 error=failure.getErrorMessage())
        return unavailable(address)

    return d.addErrback(unsure)
