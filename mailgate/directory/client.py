"""
The LDAP client: searches as the service account, and password checks by binding as a user.

Built on ldaptor's LDAPClient protocol (Twisted-native: no thread per lookup), with mailgate's
rules around it:

- TLS always: ldap:// sends StartTLS before anything else, ldaps:// starts TLS at once; the
  server's certificate is verified against [ldap] ca_file (or the system's trust store) and
  the host name of the URI.  No bind, no search ever goes in plaintext.
- Servers in the order of [ldap] uri: one that cannot be reached, fails TLS, refuses the
  service bind or does not answer within [ldap] timeout is set aside for HOLD_DOWN seconds and
  the next one is asked.  When none answers, the operation fails with DirectoryError, which the
  callers turn into a temporary reply (451 4.4.3, 454 4.7.0): never a rejection, never an accept.
- One connection (bound as bind_dn) is kept and shared by all searches, pipelined on it; a
  password check opens its own connection and closes it.
- Host names are looked up with the gateway's resolver; every timer is on the injected reactor.
  (ldaptor's own startTLS helper uses the global reactor, so the StartTLS request is sent here.)
"""

import attr
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapclient, ldaperrors

log = Logger()

HOLD_DOWN = 30.0  # seconds a failed server is skipped (unless every server failed)
_SIZE_LIMIT_EXCEEDED = 4  # resultCode: the entries so far came, more would have
_ESCAPES = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


class DirectoryError(Exception):
    """The directory could not answer (down, slow, TLS, a wrong base_dn...): try again later."""


@attr.s(frozen=True, slots=True)
class Entry:
    """One search result: its DN and its attributes (lower-case names -> tuple of str)."""

    dn = attr.ib()
    attributes = attr.ib()

    def values(self, name):
        return self.attributes.get(name.lower(), ())


def escape(value):
    """A value for an LDAP filter (RFC 4515 3): the filter's own characters escaped."""
    return "".join(_ESCAPES.get(char, char) for char in value)


def fill(template, value):
    """The filter template with every %s replaced by value, escaped."""
    return template.replace("%s", escape(value))


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Client(ldapclient.LDAPClient):
    def connectionLost(self, reason=None):
        ldapclient.LDAPClient.connectionLost(self, reason)
        self.lost = True

    lost = False


class DirectoryClient:
    """
    The directory of an LDAPConfig.  bind_password is the service account's (read from
    bind_password_file by the caller); tls_for(host) gives the client TLS creator for a host
    (default: verified against config.ca_file).
    """

    def __init__(self, config, reactor, resolver=None, bind_password=None, tls_for=None):
        self.config = config
        self.reactor = reactor
        self.resolver = resolver
        self.bind_password = bind_password
        self.timeout = config.timeout
        self._tls_for = tls_for or _VerifiedTLS(config.ca_file)
        self._held = {}  # server -> reactor time until which it is skipped
        self._shared = None  # (server, Deferred firing with a bound _Client), or None

    # -- public -------------------------------------------------------------------------------

    def search(self, filter_text, attributes=(), size_limit=1):
        """
        Deferred[list of Entry] matching filter_text below base_dn (at most size_limit: the
        server stops there).  Fails with DirectoryError when no server answers.
        """
        from ldaptor.ldapfilter import parseFilter

        request = pureldap.LDAPSearchRequest(
            baseObject=self.config.base_dn, scope=pureldap.LDAP_SCOPE_wholeSubtree,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases, sizeLimit=size_limit,
            timeLimit=max(1, int(self.timeout)), typesOnly=0, filter=parseFilter(filter_text),
            attributes=list(attributes))
        return self._across_servers("search", lambda server: self._search_on(server, request))

    def check_password(self, dn, password):
        """
        Deferred[bool]: whether a simple bind as dn with password succeeds, on a connection of
        its own.  An empty password is False without asking (RFC 4513 5.1.2: such a bind would
        "succeed" as an unauthenticated one).  DirectoryError when no server can tell.
        """
        if not password or not dn:
            return defer.succeed(False)
        return self._across_servers("password check", lambda server: self._bind_as(server, dn, password))

    def close(self):
        shared, self._shared = self._shared, None
        if shared is not None:
            shared[1].addCallbacks(_abort, lambda f: None)

    # -- failover -----------------------------------------------------------------------------

    def _order(self):
        now = self.reactor.seconds()
        servers = list(self.config.servers)
        fresh = [s for s in servers if self._held.get(s, 0) <= now]
        return fresh or servers  # all held down: try them all anyway

    def _across_servers(self, what, attempt):
        async def run():
            problems = []
            for server in self._order():
                d = defer.ensureDeferred(attempt(server))
                d.addTimeout(self.timeout, self.reactor)
                try:
                    return await d
                except _Refused as e:
                    return e.value
                except Exception as e:
                    problem = _describe(e, self.timeout)
                    problems.append("%s: %s" % (server, problem))
                    log.warn("directory server {server} failed ({what}): {problem}",
                             server=str(server), what=what, problem=problem)
                    self._held[server] = self.reactor.seconds() + HOLD_DOWN
                    self._drop(server)
            raise DirectoryError("no directory server answered (%s)" % "; ".join(problems))

        return defer.ensureDeferred(run())

    # -- connections --------------------------------------------------------------------------

    async def _connect(self, server):
        """A connected _Client with TLS started (not yet bound)."""
        addresses = [server.host]
        if _is_name(server.host):
            if self.resolver is None:
                raise DirectoryError("cannot resolve %s: no resolver" % server.host)
            from mailgate.resolver import lookup_addresses

            addresses = await lookup_addresses(self.resolver, server.host)
            if not addresses:
                raise DirectoryError("%s has no address" % server.host)
        last = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(self.reactor, address, server.port, timeout=self.timeout)
            try:
                client = await connectProtocol(endpoint, _Client())
                break
            except error.ConnectError as e:
                last = e
        else:
            raise last
        creator = self._tls_for(server.host)
        if server.scheme == "ldaps":
            client.transport.startTLS(creator)
        else:
            response = await client.send(pureldap.LDAPStartTLSRequest())
            if response.resultCode != 0:
                client.transport.abortConnection()
                raise DirectoryError("StartTLS refused: %s" % _result(response))
            client.transport.startTLS(creator)
        return client

    async def _bound(self, server):
        """The shared connection to server, bound as the service account."""
        if self._shared is not None and self._shared[0] == server:
            client = await _fork(self._shared[1])
            if not client.lost:
                return client
            self._shared = None
        d = defer.ensureDeferred(self._open_bound(server))
        self._shared = (server, d)
        try:
            return await _fork(d)
        except Exception:
            if self._shared is not None and self._shared[1] is d:
                self._shared = None
            raise

    async def _open_bound(self, server):
        client = await self._connect(server)
        if self.config.bind_dn:
            try:
                await client.bind(self.config.bind_dn, self.bind_password or "")
            except ldaperrors.LDAPInvalidCredentials:
                client.transport.abortConnection()
                log.error("directory server {server} refused the service account {bind_dn}: "
                          "check [ldap] bind_dn and bind_password_file", server=str(server),
                          bind_dn=self.config.bind_dn)
                raise DirectoryError("the service account's bind was refused")
        return client

    def _drop(self, server):
        if self._shared is not None and self._shared[0] == server:
            _, d = self._shared
            self._shared = None
            d.addCallbacks(_abort, lambda f: None)

    async def _search_on(self, server, request):
        client = await self._bound(server)
        entries, done = [], defer.Deferred()

        def handler(message):
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                entries.append(_entry(message))
                return False
            if isinstance(message, pureldap.LDAPSearchResultReference):
                return False  # a referral (Active Directory's partitions): not followed
            done.callback(message)
            return True

        client.send_multiResponse(request, handler).addErrback(
            lambda f: None if done.called else done.errback(f))
        result = await done
        if result.resultCode not in (0, _SIZE_LIMIT_EXCEEDED):
            raise DirectoryError("search failed: %s" % _result(result))
        return entries

    async def _bind_as(self, server, dn, password):
        client = await self._connect(server)
        try:
            await client.bind(dn, password)
        except ldaperrors.LDAPInvalidCredentials:
            raise _Refused(False)
        finally:
            _abort(client)
        return True


class _Refused(Exception):
    """An answer, not a failure: the server said no (no failover)."""

    def __init__(self, value):
        Exception.__init__(self, value)
        self.value = value


class _VerifiedTLS:
    """Client TLS verified against ca_file (or the system's trust store) and the host name."""

    def __init__(self, ca_file):
        self.ca_file = ca_file
        self._trust = None

    def __call__(self, host):
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(host, trustRoot=self._trust_root())

    def _trust_root(self):
        if self._trust is None:
            from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

            if not self.ca_file:
                self._trust = platformTrust()
            else:
                from cryptography import x509
                from cryptography.hazmat.primitives import serialization

                with open(self.ca_file, "rb") as f:
                    certificates = x509.load_pem_x509_certificates(f.read())
                self._trust = trustRootFromCertificates([
                    Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                    for c in certificates])
        return self._trust


def _entry(message):
    attributes = {}
    for name, values in message.attributes:
        attributes.setdefault(_text(name).lower(), ())
        attributes[_text(name).lower()] += tuple(_text(v) for v in values)
    return Entry(_text(message.objectName), attributes)


def _result(response):
    message = _text(response.errorMessage or b"").strip()
    return "result %s%s" % (response.resultCode, " (%s)" % message if message else "")


def _fork(d):
    """A Deferred with d's result that leaves d's own result untouched."""
    out = defer.Deferred()

    def both(result):
        if isinstance(result, Failure):
            out.errback(result)
            return None  # handed on: the shared Deferred is dropped by its owner
        out.callback(result)
        return result

    d.addBoth(both)
    return out


def _abort(client):
    transport = getattr(client, "transport", None)
    if transport is not None and not client.lost:
        transport.abortConnection()
    return client


def _is_name(host):
    from mailgate.smtp.address import is_ip_address

    return not is_ip_address(host)


def _describe(e, timeout):
    if isinstance(e, (defer.TimeoutError, defer.CancelledError)):
        return "no answer within %gs" % timeout
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, Failure):
        e = e.value
    text = str(e) or type(e).__name__
    return " ".join(text.split())
