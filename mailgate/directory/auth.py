"""
SMTP AUTH against the directory ([auth] backend = ldap), and several backends in a row.

LDAPAuth finds the user with [ldap] user_filter (by default userPrincipalName, sAMAccountName or
mail: "alice@corp.example", "alice" and "alice@example.com" all log in as Alice) and checks the
password by a simple bind as the entry found, over TLS, on a connection of its own.  Exactly one
entry must match.  The addresses the user may then send as are the entry's mail and its
proxyAddresses of type smtp (primary "SMTP:" and secondary "smtp:"); X500:, SIP: and the like
are not addresses.  The entry is cached for [ldap] cache_ttl (an unknown name for
negative_cache_ttl); the password itself is never cached: every AUTH is a bind.

Chain asks backends in order until one knows the user (the users file, then the directory, or
the other way round); a backend that fails (directory down) is passed over, and when nobody
authenticated the user the first failure is what AUTH reports (454 4.7.0: try again), never a
wrong password.  An LDAP user also gets the senders the users file grants to it, under the name
it logged in with, its userPrincipalName or its sAMAccountName (the first one the file has).

The brute-force limits (failed AUTHs per connection and per client) wrap IAuthBackend, so they
apply to these as to the users file.
"""

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.directory.cache import TTLCache
from mailgate.directory.client import fill
from mailgate.idn import canonical_address
from mailgate.interfaces import IAuthBackend, IUser

log = Logger()

SENDER_ATTRIBUTES = ("mail", "proxyAddresses")
NAME_ATTRIBUTES = ("userPrincipalName", "sAMAccountName")  # how the users file may name the user


def senders_of(entry):
    """The addresses an entry may send as: mail, and proxyAddresses of type smtp."""
    found = []
    for value in entry.values("mail"):
        found.append(value)
    for value in entry.values("proxyaddresses"):
        kind, colon, address = value.partition(":")
        if colon and kind.lower() == "smtp" and "@" in address:
            found.append(address)
    out = []
    for address in found:
        canonical = canonical_address(address.strip())
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


@implementer(IUser)
@attr.s(frozen=True, slots=True)
class DirectoryUser:
    """A user the directory authenticated: its addresses, plus grants from the users file."""

    name = attr.ib()
    dn = attr.ib()
    senders = attr.ib(converter=tuple)  # canonical addresses (A-label domain, lower case)
    grants = attr.ib(default=None)  # an IUser of the users file for the same user, or None
    names = attr.ib(default=(), converter=tuple)  # the name given, then UPN and sAMAccountName

    def may_send_as(self, address):
        if address and canonical_address(address) in self.senders:
            return True
        return self.grants is not None and self.grants.may_send_as(address)


@implementer(IAuthBackend)
class LDAPAuth:
    def __init__(self, client, config, clock):
        self.client = client
        self.template = config.user_filter
        self.cache = TTLCache(clock, config.cache_ttl, config.negative_cache_ttl,
                              config.cache_size)

    @defer.inlineCallbacks
    def authenticate(self, username, password):
        if not username or not password:
            return None
        entry = yield self.cache.get(username.lower(), self._find)
        if not entry:
            return None
        ok = yield self.client.check_password(entry.dn, password)
        if not ok:
            return None
        names = [username] + [v for a in NAME_ATTRIBUTES for v in entry.values(a) if v != username]
        return DirectoryUser(username, entry.dn, senders_of(entry), names=names)

    def _find(self, key):
        d = self.client.search(fill(self.template, key),
                               attributes=SENDER_ATTRIBUTES + NAME_ATTRIBUTES, size_limit=2)

        def found(entries):
            if len(entries) > 1:
                log.warn("AUTH username {username} matches several directory entries "
                         "({dns}): refused; make [ldap] user_filter find one", username=key,
                         dns=", ".join(e.dn for e in entries))
                return None
            return entries[0] if entries else None

        return d.addCallback(found)


@implementer(IAuthBackend)
class Chain:
    """
    backends in order; grants (a users file backend with user_grants(name), or None) adds the
    users file's senders to a user the directory authenticated.
    """

    def __init__(self, backends, grants=None):
        self.backends = tuple(backends)
        self.grants = grants

    @defer.inlineCallbacks
    def authenticate(self, username, password):
        failures = []
        for backend in self.backends:
            try:
                user = yield backend.authenticate(username, password)
            except Exception:
                failures.append(Failure())
                continue
            if user is None:
                continue
            if self.grants is not None and isinstance(user, DirectoryUser):
                for name in user.names or (username,):  # whichever name the file uses
                    granted = yield self.grants.user_grants(name)
                    if granted is not None:
                        user = attr.evolve(user, grants=granted)
                        break
            return user
        if failures:
            failures[0].raiseException()
        return None
