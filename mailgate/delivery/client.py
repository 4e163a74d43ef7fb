"""
Outbound delivery: one attempt to hand a message to the next hops of its route, over SMTP.

    deliverer = Deliverer(reactor, "mx.example.com", config.delivery, config.tls)
    d = deliverer.deliver(route, hops, sender, recipients, data)
    # -> Deferred firing with [RecipientResult, ...], one per recipient, in order; never errbacks

Built on twisted.mail.smtp's ESMTPSender and ESMTPSenderFactory (DeliverySender and
DeliveryFactory below), with the client-side weaknesses listed in ../shared/twisted-mail-notes.md
fixed.  This module owns the SMTP dialogue and its state (DeliverySender), one connection
(DeliveryFactory) and the hop failover of an attempt (Deliverer); the parts that do not need the
dialogue's state are units of their own, each with its part of this contract:

  mailgate.delivery.dotstuff    the DATA transform (C1/C2)
  mailgate.delivery.tls         the outbound TLS policy decision (C5)
  mailgate.delivery.outcome     the reply-to-outcome mapping and the codes we report
  mailgate.delivery.transcript  the per-attempt transcript: session id and protocol events
  mailgate.delivery.extensions  MAIL/RCPT parameters: 8BITMIME, SMTPUTF8, DSN, CHUNKING
  mailgate.delivery.chunking    the message in BDAT chunks when the hop offers CHUNKING

DotStuffer, stuff, parse_reply and POLICIES stay importable from here.

C1/C2  dot-stuffing and CRLF across chunks: mailgate.delivery.dotstuff.
C3     If any byte is buffered behind the 220 reply to STARTTLS, the hop fails (451 4.7.0 "STARTTLS
       response injection"), the connection is aborted, the injected replies are never acted upon
       and the hop is never retried in plaintext, whatever the policy.
C4     retries=0 (the queue owns retries); connect_timeout, command_timeout per reply (on the
       injected reactor) and data_timeout around the DATA transfer and its final reply.
C5     Per-route TLS policy (none, opportunistic, required, verify) and what it does when STARTTLS
       is not offered, refused or fails: mailgate.delivery.tls.

AUTH (route.username): PLAIN or LOGIN, whichever is offered (PLAIN preferred), and only inside TLS:
without TLS the hop fails (451 4.7.10) before any credential is sent.  A refused login (535) is a
temporary failure of the hop (451 4.7.8): an admin fixes credentials, mail must not bounce.

Outcomes (what each reply, or our own trouble, is reported as, and the codes we use):
mailgate.delivery.outcome.

Hop order and failover: the next hop is tried (for the recipients still open) after a connection
failure, a dropped connection or timeout, a TLS failure under required/verify, a 4xx (or a 5xx we
treat as temporary) at greeting, EHLO, STARTTLS, AUTH, MAIL, DATA or after the final dot, and when
no recipient was accepted and some got a 4xx (those fail over; the 5xx ones bounce).  A 4xx RCPT
reply while others were accepted defers that recipient for this attempt (no failover).  5xx at
MAIL or after the final dot bounces every open recipient.

Protocol events (each connection a session with its own id; credentials never appear):
mailgate.delivery.transcript.
"""

import io
import re

import attr
from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IClientAuthentication
from zope.interface import implementer

from mailgate.delivery.chunking import BDATSending
from mailgate.delivery.conncache import ConnectionCache
from mailgate.delivery.dotstuff import DotStuffer, stuff  # noqa: F401 (stuff: re-exported)
from mailgate.delivery.extensions import plan_transaction
from mailgate.delivery.outcome import (
    _describe,
    _hop_failure,
    _label,
    _Outcome,
    _own,
    _Reason,
    _temporary,
    parse_reply,
    session_result,
    transaction_results,
)
from mailgate.delivery.tls import (
    _PLAINTEXT,
    POLICIES,
    ClientTLS,
    _TLSConfigError,
    handshake_failed,
    handshake_timed_out,
    not_offered,
    refused,
    retry_in_plaintext,
)
from mailgate.delivery.transcript import Transcript
from mailgate.tcp import connect_tcp
from mailgate.smtp.address import is_ip_address
from mailgate.envelope import RecipientResult
from mailgate.events import message_id

log = Logger(namespace="mailgate.delivery.client")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- the protocol --------------------------------------------------------------------------------


@implementer(IClientAuthentication)
class _PLAIN:
    """PLAIN with an empty authorization identity (RFC 4616), in one step."""

    def __init__(self, user):
        self.user = user

    def getName(self):
        return b"PLAIN"

    def challengeResponse(self, secret, chal):
        return b"\0" + self.user + b"\0" + secret


@implementer(IHandshakeListener)
class DeliverySender(BDATSending, smtp.ESMTPSender):
    """
    ESMTPSender with mailgate's policy: one transaction, decided once; the decision (per-recipient
    RecipientResults, final or to be retried at the next hop) is kept on the factory, which hands
    it to the Deliverer when the connection is gone.
    """

    # No SMTPClient debug transcript: it would hold the AUTH exchange (credentials) and it is never
    # shown anyway.  (Our protocol events are mailgate.delivery.transcript's, credentials masked.)
    debug = False

    def _registerAuthenticators(self):
        # Only inside TLS (see authenticate), so the simple mechanisms; PLAIN first (one round).
        self.registerAuthenticator(_PLAIN(self.username))
        self.registerAuthenticator(smtp.LOGINAuthenticator(self.username))

    # -- set-up and bookkeeping

    def connectionMade(self):
        self._transcript = Transcript(self.factory.events, self.factory.route, self.transport)
        self._transcript.connect(self.hop, self.factory.policy, self.factory.message_id)
        self.phase = "the greeting"
        self.decided = False
        self.tls_version = None
        self._tlsStarted = False
        self._handshakeDone = False
        self._dataTimer = None
        self._ehloItems = {}
        self._stuffer = DotStuffer()
        self.born = self.factory.reactor.seconds()
        self.reused = 0  # transactions on this connection after the first
        self.idle = False  # parked in the connection cache, waiting for the next message
        self._replied = False  # a reply came since this transaction started
        smtp.ESMTPSender.connectionMade(self)

    @property
    def hop(self):
        return self.factory.hop

    def _where(self):
        return (_label(self.hop), self.phase)

    def _result(self, recipient, outcome, reason):
        plan = getattr(self, "_plan", None)
        return session_result(recipient, outcome, reason, self.hop, self.tls_version,
                              self._transcript.session, dsn=plan is not None and plan.dsn)

    def _decide(self, final=None, retry=None, tls_failed=False):
        """Record the outcome of this connection (once)."""
        if self.decided:
            return
        self.decided = True
        self._cancelDataTimer()
        self.factory.outcome = _Outcome(dict(final or {}), dict(retry or {}), tls_failed)

    def _hopFailed(self, reason, tls_failed=False):
        """Decide: every recipient to be retried at the next hop, with reason."""
        if self.decided:
            return
        log.info(
            "Delivery to {hop_label} failed at {phase}: {code} {status} {text}",
            hop_label=_label(self.hop), phase=self.phase, code=reason.code,
            status=reason.status, text=reason.text,
        )
        retry = {r: self._result(r, "deferred", reason) for r in self.factory.recipients}
        self._decide(retry=retry, tls_failed=tls_failed)

    def _failHop(self, reason, abort=False, tls_failed=False):
        """The hop failed (for now): decide so, then QUIT (abort when the dialogue is broken)."""
        self._hopFailed(reason, tls_failed)
        if abort:
            self.transport.abortConnection()
        else:
            self._quit()

    def _quit(self):
        self.phase = "QUIT"
        self._disconnectFromServer()

    # -- the transcript (mailgate.delivery.transcript: it only watches)

    def sendLine(self, line):
        self._transcript.command(line)
        smtp.ESMTPSender.sendLine(self, line)

    def lineReceived(self, line):
        self._replied = True
        self._transcript.reply_line(line)
        return smtp.ESMTPSender.lineReceived(self, line)

    def connectionLost(self, reason=connectionDone):
        self._transcript.disconnect(reason)
        smtp.ESMTPSender.connectionLost(self, reason)
        self._cancelDataTimer()
        if self.idle:
            self.idle = False
            self.factory.cache.discard(self)
        if self.decided:
            return
        if self.reused and not self._replied:
            # A cached connection the server had closed meanwhile: not a failure of the hop.
            self._decide(retry={r: self._result(r, "deferred", _Reason(
                451, "4.4.2", "cached connection to %s was closed" % _label(self.hop)))
                for r in self.factory.recipients})
            self.factory.outcome = attr.evolve(self.factory.outcome, stale=True)
            return
        if self._tlsStarted and not self._handshakeDone:
            self._hopFailed(handshake_failed(self.factory.policy, self.hop, reason),
                            tls_failed=True)
        else:
            if reason.check(error.ConnectionDone):
                text = "%s closed the connection during %s" % (_label(self.hop), self.phase)
            else:
                text = "lost connection with %s during %s: %s" % (
                    _label(self.hop), self.phase, _describe(reason))
            self._hopFailed(_Reason(451, "4.4.2", text))

    # -- timeouts (C4)

    def timeoutConnection(self):
        if not self.decided and self._tlsStarted and not self._handshakeDone:
            reason = handshake_timed_out(self.factory.policy, self.hop, self.timeout)
            self._failHop(reason, abort=True, tls_failed=True)
        elif not self.decided:
            reason = _Reason(451, "4.4.2", "timeout after %gs waiting for %s's reply to %s"
                             % (self.timeout, _label(self.hop), self.phase))
            self._failHop(reason, abort=True)
        else:
            self.transport.abortConnection()

    def _dataTimedOut(self):
        self._dataTimer = None
        reason = _Reason(451, "4.4.2", "DATA to %s not finished within %gs"
                         % (_label(self.hop), self.factory.data_timeout))
        self._failHop(reason, abort=True)

    def _cancelDataTimer(self):
        if self._dataTimer is not None and self._dataTimer.active():
            self._dataTimer.cancel()
        self._dataTimer = None

    def sendError(self, exc):
        """Every error path of SMTPClient/ESMTPClient: a temporary failure of the hop."""
        if self.decided:
            self.transport.abortConnection()
            return
        if isinstance(exc, smtp.SMTPProtocolError):
            self._failHop(_Reason(451, "4.5.0", "%s sent a malformed reply during %s"
                                  % (_label(self.hop), self.phase)), abort=True)
        elif isinstance(exc, smtp.SMTPClientError) and exc.code > 0:
            self._failHop(_temporary(parse_reply(exc.code, exc.resp), self._where()))
        else:
            self._failHop(_Reason(451, "4.4.2", "%s failed during %s: %s"
                                  % (_label(self.hop), self.phase, exc)), abort=True)

    # -- greeting and EHLO

    def smtpConnectionFailed(self, code, resp):
        self._failHop(_temporary(parse_reply(code, resp), self._where()))

    def esmtpState_ehlo(self, code, resp):
        if self._tlsStarted:
            # Sent at once, written by the TLS layer when its handshake is done.
            self.phase = "EHLO after STARTTLS" if self._handshakeDone else "the TLS handshake"
        else:
            self.phase = "EHLO"
        smtp.ESMTPSender.esmtpState_ehlo(self, code, resp)
        self._failresponse = self._ehloFailed

    def _ehloFailed(self, code, resp):
        fallback = not self.factory.username and (
            self._handshakeDone or self.factory.policy in ("none", "opportunistic", _PLAINTEXT))
        if 500 <= code < 600 and fallback:
            # An old server: HELO, then straight to MAIL (no STARTTLS, no AUTH without EHLO).
            self.phase = "HELO"
            self.smtpState_helo(code, resp)
            self._failresponse = self._heloFailed
        else:
            self._failHop(_temporary(parse_reply(code, resp), self._where()))

    def _heloFailed(self, code, resp):
        self._failHop(_temporary(parse_reply(code, resp), self._where()))

    def esmtpState_serverConfig(self, code, resp):
        items = {}
        for line in resp.splitlines():
            words = line.split(None, 1)
            if words:
                items[words[0].upper()] = words[1] if len(words) > 1 else None
        self._ehloItems = items
        self.tryTLS(code, resp, items)

    # -- STARTTLS (C3, C5)

    def tryTLS(self, code, resp, items):
        policy = self.factory.policy
        if self._tlsStarted or policy in ("none", _PLAINTEXT):
            return self.authenticate(code, resp, items)
        if b"STARTTLS" in items and self.context is not None:
            self.phase = "STARTTLS"
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._starttlsRefused
            self.sendLine(b"STARTTLS")
        else:
            failed = not_offered(policy, self.hop)
            if failed is None:
                self.authenticate(code, resp, items)
            else:
                self._failHop(failed)

    def _starttlsRefused(self, code, resp):
        failed = refused(self.factory.policy, self.hop, code, parse_reply(code, resp))
        if failed is None:
            return self.authenticate(code, resp, self._ehloItems)
        self._failHop(failed)

    def esmtpState_starttls(self, code, resp):
        if self._buffer:
            # C3: bytes sent together with the 220 would be taken as replies inside TLS.
            injected = len(self._buffer)
            self._buffer = b""
            text = "STARTTLS response injection: %s sent %d bytes after its 220 reply" % (
                _label(self.hop), injected)
            log.warn("{text}", text=text, hop_label=_label(self.hop), injected=injected)
            self._failHop(_Reason(451, "4.7.0", text), abort=True)
            return
        self._tlsStarted = True
        self.phase = "the TLS handshake"
        try:
            self.transport.startTLS(self.context)
        except Exception:
            log.failure("Cannot start TLS with {hop_label}", hop_label=_label(self.hop))
            return self.esmtpTLSFailed()
        self._tlsMode = True
        # RFC 3207: forget what the server said before TLS, ask again.
        self.esmtpState_ehlo(code, resp)

    def esmtpTLSFailed(self, code=-1, resp=None):
        # startTLS raised (esmtpState_starttls): same as a failed handshake.
        self._failHop(_Reason(451, "4.7.5", "cannot start TLS with %s" % _label(self.hop)),
                      abort=True, tls_failed=True)

    def handshakeCompleted(self):
        self._handshakeDone = True
        cipher = None
        try:
            self.tls_version = self.transport.getHandle().get_protocol_version_name()
            cipher = self.transport.getHandle().get_cipher_name()
        except Exception:
            self.tls_version = "TLS"
        self.phase = "EHLO after STARTTLS"
        self._transcript.tls(self.tls_version, cipher)

    # -- AUTH

    def authenticate(self, code, resp, items):
        if not self.factory.username:
            return self.smtpState_from(code, resp)
        self.phase = "AUTH"
        if not self._handshakeDone:
            text = "not sending credentials to %s without TLS (tls = %s)" % (
                _label(self.hop), self.factory.policy)
            log.warn("{text}", text=text, hop_label=_label(self.hop), policy=self.factory.policy)
            return self._failHop(_Reason(451, "4.7.10", text))
        offered = (items.get(b"AUTH") or b"").upper().split()
        if not any(a.getName() in offered for a in self.authenticators):
            text = "authentication is configured, but %s offers neither AUTH PLAIN nor LOGIN" % (
                _label(self.hop),)
            log.warn("{text}", text=text, hop_label=_label(self.hop))
            return self._failHop(_Reason(451, "4.7.0", text))
        smtp.ESMTPSender.authenticate(self, code, resp, items)

    def _esmtpState_plainAuth(self, code, resp):
        # Stock: try PLAIN again with other framing, i.e. send the password twice.  No.
        self.esmtpAUTHDeclined(code, resp)

    def esmtpAUTHDeclined(self, code=-1, resp=None):
        reason = parse_reply(code, resp)
        log.warn(
            "Authentication as {username} to {hop_label} failed: {code} {status} {text}",
            username=self.factory.route.username, hop_label=_label(self.hop), code=reason.code,
            status=reason.status, text=reason.text,
        )
        self._failHop(_temporary(reason, self._where()))

    esmtpAUTHServerError = esmtpAUTHDeclined

    def esmtpAUTHMalformedChallenge(self, code=-1, resp=None):
        self._failHop(_Reason(451, "4.5.0", "%s sent a malformed AUTH challenge"
                              % _label(self.hop)))

    # -- the transaction

    def smtpState_from(self, code, resp):
        if self.decided:
            return self._quit()
        self.phase = "MAIL"
        # The extensions this hop offers and the message needs (mailgate.delivery.extensions).
        plan = self._plan = plan_transaction(
            self._ehloItems, self.factory.transfer, self.factory.sender_text,
            self.factory.recipients, self.factory.data, self.hop, self.factory.chunking)
        self._refused = {r: self._result(r, "bounced", reason) for r, reason in plan.refused.items()}
        if not plan.rcpts:
            self._decide(final=self._refused)
            return self._quit()
        self._from = plan.mail
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_to
        self._failresponse = self._mailFailed
        self.sendLine(plan.mail)

    def _mailFailed(self, code, resp):
        reason = parse_reply(code, resp)
        if 500 <= code < 600:
            self._decide(final={r: self._result(r, "bounced", reason)
                                for r in self.factory.recipients})
            self._quit()
        else:
            self._failHop(_temporary(reason, self._where()))

    def smtpState_to(self, code, resp):
        self.phase = "RCPT"
        smtp.ESMTPSender.smtpState_to(self, code, resp)
        self._failresponse = self.smtpTransferFailed

    def smtpState_toOrData(self, code, resp):
        # As SMTPClient's, with our own address formatting (no smtp.Address/quoteaddr parsing).
        if code == 421 and self.lastAddress is not None:
            return self._failHop(parse_reply(code, resp))
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if self.successAddresses and self._plan.chunking:
                self._startBDAT()
            elif self.successAddresses:
                self.phase = "DATA"
                self.sendLine(b"DATA")
                self._expected = [354]
                self._okresponse = self.smtpState_data
            else:
                return self.smtpState_msgSent(code, b"No recipients accepted")
        else:
            self.sendLine(self._plan.rcpt(self.lastAddress))

    def smtpState_data(self, code, resp):
        self.phase = "end of DATA"
        self._dataTimer = self.factory.reactor.callLater(
            self.factory.data_timeout, self._dataTimedOut)
        smtp.ESMTPSender.smtpState_data(self, code, resp)

    def transformChunk(self, chunk):
        self.resetTimeout()
        return self._stuffer.feed(chunk)

    def finishedFileTransfer(self, lastsent):
        self.transport.write(self._stuffer.finish())

    def smtpState_msgSent(self, code, resp):
        self._cancelDataTimer()
        # The reply to the final dot, or to BDAT LAST: the transaction is over, cleanly.  Not
        # kept after a 4xx to it: a server in trouble (or a retry after 1s) would meet the same
        # session again for as long as it lives; a 5xx is about the message, not the server.
        finished = code > 0 and not 400 <= code < 500 and (self.phase == "end of DATA" or (
            self.phase == "BDAT" and getattr(self, "_bdatLast", False)))
        if self._from is not None and not self.decided:
            self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
        self._from = None
        if not (finished and self.factory.park(self)):
            self._quit()

    # -- the connection cache (mailgate.delivery.conncache)

    def usable(self):
        """Still connected and between transactions: a next MAIL FROM may go out."""
        return self.idle and self.transport is not None and self.transport.connected

    def closeIdle(self):
        self.idle = False
        self._quit()

    def next_transaction(self, sender, recipients, data, message_id, transfer=None):
        """Run one more transaction on this connection; -> Deferred[_Outcome]."""
        self.idle = False
        self.reused += 1
        self._replied = False
        self.decided = False
        self._stuffer = DotStuffer()
        result = self.factory.begin(sender, recipients, data, message_id, transfer)
        self._transcript.transaction(message_id)
        self.smtpState_from(250, b"")
        return result

    def sentMail(self, code, resp, numOk, addresses, log):
        """
        Combine the RCPT replies ((address, code, resp) in the order sent) with the reply to DATA
        or to the final dot (or, when nobody was accepted, nothing).
        """
        final, retry = transaction_results(
            list(self._plan.rcpts), addresses, code, resp, self._where(), self._result)
        final.update(self._refused)
        self._decide(final=final, retry=retry)

    # -- data source: ours, not SenderMixin's

    def getMailFrom(self):
        return self.factory.sender

    def getMailTo(self):
        return list(self._plan.rcpts)  # recipients; their RCPT lines are in the plan

    def getMailData(self):
        return self.factory.file


class DeliveryFactory(smtp.ESMTPSenderFactory):
    """
    ESMTPSenderFactory for one connection of one attempt: retries=0, our timeouts and reactor;
    self.result fires (never errbacks) with an _Outcome once the connection is gone.
    """

    protocol = DeliverySender
    noisy = False
    events = None  # the Deliverer's EventBus, or None: no protocol events
    message_id = None  # of the message being delivered (for the "connect" event)

    def __init__(self, reactor, hostname, hop, policy, route, sender, recipients, data,
                 context, delivery_config, transfer=None):
        username = route.username.encode("utf-8") if route.username else None
        password = (route.password or "").encode("utf-8") if route.username else None
        smtp.ESMTPSenderFactory.__init__(
            self, username, password,
            # smtp.Address rejects address literals and UTF-8: the reverse-path is sent from
            # self.sender by DeliverySender.smtpState_from, so it is not parsed here.
            "", [], io.BytesIO(b""), defer.Deferred(),
            retries=0, timeout=delivery_config.command_timeout, contextFactory=context,
            heloFallback=False, requireAuthentication=bool(username),
            requireTransportSecurity=policy in ("required", "verify"), hostname=None,
        )
        self.domain = hostname
        self.reactor = reactor
        self.hop = hop
        self.policy = policy
        self.route = route
        self.username = username
        self.chunking = getattr(delivery_config, "chunking", True)
        self.data_timeout = delivery_config.data_timeout
        self.connect_timeout = delivery_config.connect_timeout
        self.cache = None  # a ConnectionCache, and our key in it: set by the Deliverer
        self.cache_key = None
        self._job(sender, recipients, data, transfer)

    def _job(self, sender, recipients, data, transfer):
        self.sender = sender.encode("utf-8")
        self.sender_text = sender
        self.recipients = list(recipients)
        self.wire_recipients = [r.encode("utf-8") for r in recipients]
        self.data = data
        self.file = io.BytesIO(data)
        self.transfer = transfer  # a mailgate.delivery.extensions.Transfer, or None
        self.outcome = None

    def begin(self, sender, recipients, data, message_id, transfer=None):
        """The next transaction on this (cached) connection; -> its result Deferred."""
        self._job(sender, recipients, data, transfer)
        self.message_id = message_id
        self.sendFinished = False
        self.result = defer.Deferred()
        return self.result

    def park(self, protocol):
        """
        After a transaction ended cleanly: report its outcome now and keep the connection for
        the next message to this destination.  False when it is not kept (then QUIT).
        """
        if self.cache is None or self.outcome is None or \
                not self.cache.accepts(self.cache_key, protocol.born):
            return False
        protocol.idle = True
        if not self.cache.park(self.cache_key, protocol):
            protocol.idle = False
            return False
        self._finish(self.outcome)
        return True

    def buildProtocol(self, addr):
        p = smtp.ESMTPSenderFactory.buildProtocol(self, addr)
        p.callLater = self.reactor.callLater  # TimeoutMixin on the injected reactor
        return p

    def clientConnectionFailed(self, connector, reason):
        if reason.check(error.ConnectionRefusedError):
            text = "connection refused by %s" % _label(self.hop)
        elif reason.check(error.TimeoutError):
            text = "connection to %s timed out after %gs" % (
                _label(self.hop), self.connect_timeout)
        else:
            text = "cannot connect to %s: %s" % (_label(self.hop), _describe(reason))
        log.info("Delivery: {text}", text=text, hop_label=_label(self.hop))
        self._finish(_hop_failure(self.recipients, _Reason(451, "4.4.1", text)))

    def clientConnectionLost(self, connector, reason):
        outcome = self.outcome
        if outcome is None:  # the protocol always decides; belt and braces
            text = "lost connection with %s: %s" % (_label(self.hop), _describe(reason))
            outcome = _hop_failure(self.recipients, _Reason(451, "4.4.2", text), self.hop)
        self._finish(outcome)

    def _finish(self, outcome):
        if not self.sendFinished:
            self.sendFinished = True
            self.result.callback(outcome)


# --- the deliverer -------------------------------------------------------------------------------


class Deliverer:
    """
    One delivery attempt at a time per call, on the given reactor (connectTCP, callLater).
    hostname is what we say in EHLO; delivery_config gives the timeouts, tls_config our
    certificate (offered when asked) and the trust store for tls = verify; every SMTP session
    emits protocol events on events (see the module docstring) when it is given.
    """

    def __init__(self, reactor, hostname, delivery_config, tls_config, events=None):
        self.reactor = reactor
        self.events = events  # a mailgate.events.EventBus for protocol events, or None
        self.hostname = hostname
        self.config = delivery_config
        self.tls_config = tls_config
        self._tls = ClientTLS(tls_config)
        self.cache = ConnectionCache(reactor, delivery_config.connection_cache_time,
                                     delivery_config.connection_reuse_time,
                                     delivery_config.per_destination_concurrency)

    def close(self):
        """Close the connections kept open for the next message (we stop, or a reload)."""
        self.cache.close_all()

    def deliver(self, route, hops, sender, recipients, data, transfer=None):
        """
        Try hops in order for the recipients; -> Deferred[list[RecipientResult]], one per
        recipient in order.  Never errbacks.  transfer (mailgate.delivery.extensions.Transfer):
        what the envelope asks of the hops (SMTPUTF8, DSN).
        """
        recipients = list(recipients)
        d = defer.maybeDeferred(self._deliver, route, list(hops), sender, recipients, data,
                                transfer)

        def internal_error(f):
            log.failure("Delivery attempt failed unexpectedly", f)
            reason = _Reason(451, "4.3.0", "internal error during delivery: %s" % _describe(f))
            return [RecipientResult(r, "deferred", reason.code, reason.status, reason.text)
                    for r in recipients]

        return d.addErrback(internal_error)

    @defer.inlineCallbacks
    def _deliver(self, route, hops, sender, recipients, data, transfer=None):
        unique = list(dict.fromkeys(recipients))
        results = {}
        if _CONTROL.search(sender):
            reason = _Reason(553, "5.1.7", "invalid sender address (control characters)")
            return [_own(r, "bounced", reason) for r in recipients]
        for r in unique:
            if _CONTROL.search(r) or not r:
                results[r] = _own(r, "bounced", _Reason(
                    553, "5.1.3", "invalid recipient address (empty or control characters)"))
        policy = route.tls if route.tls in POLICIES else None
        pending = {
            r: _own(r, "deferred", _Reason(451, "4.4.4", "no hop to deliver to"))
            for r in unique if r not in results
        }
        for hop in hops:
            if not pending:
                break
            outcome = yield self._attempt(route, hop, policy, sender, list(pending), data,
                                          transfer)
            if retry_in_plaintext(policy, route, hop, outcome):
                outcome = yield self._attempt(
                    route, hop, _PLAINTEXT, sender, list(pending), data, transfer)
            for r, result in outcome.final.items():
                results[r] = result
                pending.pop(r, None)
            pending.update(outcome.retry)
        results.update(pending)
        return [results[r] for r in recipients]

    def _attempt(self, route, hop, policy, sender, recipients, data, transfer=None):
        """One connection to hop -> Deferred[_Outcome]."""
        if policy is None:
            reason = _Reason(451, "4.3.5", "unknown tls policy %r for route %s"
                             % (route.tls, route.name))
            return defer.succeed(_hop_failure(recipients, reason))
        if not is_ip_address(hop.address):
            reason = _Reason(451, "4.4.4", "hop %s: %r is not an IP address (not resolved here)"
                             % (hop.name, hop.address))
            return defer.succeed(_hop_failure(recipients, reason))
        try:
            context = self._tls.context(policy, hop)
        except _TLSConfigError as e:
            log.error("Cannot set up TLS for {hop_label}: {error}", hop_label=_label(hop),
                      error=str(e))
            reason = _Reason(451, "4.3.5", "local TLS configuration error: %s" % (e,))
            return defer.succeed(_hop_failure(recipients, reason))
        key = (route.name, route.username, hop.address, hop.port, hop.name, policy)
        mid = message_id(data) if self.events is not None else None
        cached = self.cache.take(key)
        if cached is not None:
            d = cached.next_transaction(sender, recipients, data, mid, transfer)

            def stale(outcome):
                if outcome.stale:  # closed by the server while idle: a new connection, at once
                    return self._connect(key, route, hop, policy, sender, recipients, data,
                                         context, mid, transfer)
                return outcome

            return d.addCallback(stale)
        return self._connect(key, route, hop, policy, sender, recipients, data, context, mid,
                             transfer)

    def _connect(self, key, route, hop, policy, sender, recipients, data, context, mid,
                 transfer=None):
        factory = DeliveryFactory(
            self.reactor, self.hostname, hop, policy, route, sender, recipients, data, context,
            self.config, transfer,
        )
        factory.cache, factory.cache_key = self.cache, key
        if self.events is not None:
            factory.events = self.events
            factory.message_id = mid
        d = factory.result
        connect_tcp(self.reactor, hop.address, hop.port, factory,
                    timeout=self.config.connect_timeout)
        return d
