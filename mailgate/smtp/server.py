"""
The SMTP listener: twisted.mail.smtp.ESMTP with its command loop replaced.

Stock ESMTP runs pipelined commands out of order when checks are asynchronous, lets plaintext sent
before STARTTLS run inside TLS, buffers without bound and leaves DATA on an over-long line
(../shared/twisted-mail-notes.md, S1-S15).  This protocol keeps ESMTP's identity (and works with
its factory conventions) but owns framing: commands are taken one at a time, strictly in order,
input waits while a check is pending, every buffer is bounded, and DATA is scanned in bulk by
mailgate.smtp.datascan.  Every answer is a mailgate.envelope.Reply with an enhanced status code.
"""

import secrets

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp

from mailgate.envelope import Envelope, Reply
from mailgate.headerfirewall import inbound_patterns
from mailgate.errors import QueueUnavailable, ReplyError
from mailgate.session import Session
from mailgate.smtp import address, chunking, clientcert, limits, policy, replies, sasl
from mailgate.smtp import params as esmtp
from mailgate.smtp.anvil import Anvil
from mailgate.smtp.datascan import DataScanner
from mailgate.smtp.gate import Gate
from mailgate.smtp.handoff import hand_off, scan_problem
from mailgate.smtp.recipients import check as check_recipient
from mailgate.smtp.replies import (
    AUTH_BAD, AUTH_FIRST, AUTH_NEEDS_TLS, AUTH_OK, AUTH_TEMP, BAD_CHAR, BAD_SEQUENCE_HELO,
    LINE_TOO_LONG, NEED_MAIL, NESTED_MAIL, NO_RCPT, OK, TEMP_FAIL, TLS_FIRST, TOO_BIG,
    TOO_MANY_RCPTS, UNKNOWN,
)

log = Logger()

MAX_COMMAND_LINE = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE = 12288  # AUTH with an initial response, and SASL responses (RFC 4954 4)
MAX_PARTIAL_LINE = 16384  # bytes without CRLF before we give up on the client
MAX_PENDING = 65536  # buffered input while a check runs, before we stop reading

# Only these verbs run; ESMTP's own do_* and ext_* methods are never reachable by name.
COMMANDS = frozenset(
    "EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY EXPN HELP QUIT".split())

R = Reply


class SMTPServer(smtp.ESMTP):
    """One SMTP session on a listener.  All policy comes from the factory's config objects."""

    def __init__(self, factory):
        smtp.ESMTP.__init__(self, {}, None)
        self.factory = factory
        self.listener = factory.listener
        self.limits = factory.listener.limits
        self.hostname = factory.gateway.hostname
        self.host = self.hostname  # ESMTP's own attribute (bytes); mailgate uses hostname
        self.clock = factory.clock
        self._buffer = b""
        self._busy = False
        self._paused = False
        self._closed = False
        self._scanner = None
        self._chunk = None  # a mailgate.smtp.chunking.Chunk whose octets are being read
        self._sasl = None  # a sasl.Exchange waiting for the next response line
        self._timers = {}
        self.errors = 0
        self.auth_failures = 0
        self.helo = None
        self.esmtp = False
        self.tls = factory.listener.tls == "implicit"
        self.user = None
        self.cert_name = None  # the relay_client_certs name a client certificate proved
        self._cert_checked = False
        self.session = None
        self.guard = None  # the limits across sessions (mailgate.smtp.limits.Guard)
        self._greeted = False
        self._data_bytes = 0
        self._reset_transaction()

    # -- session facts (read by hooks and, later, filters) -----------------------------------

    @property
    def client_ip(self):
        return getattr(self.transport.getPeer(), "host", "")

    @property
    def client_port(self):
        return getattr(self.transport.getPeer(), "port", 0)

    @property
    def listener_name(self):
        return self.listener.name

    def tls_info(self):
        """(version, cipher) of this session's TLS, or (None, None)."""
        from mailgate.tls import tls_session_info

        return tls_session_info(self.transport) if self.tls else (None, None)

    # -- connection --------------------------------------------------------------------------

    def _protocol_event(self, event, data=""):
        events = self.factory.events
        if events is None:
            return
        events.emit("protocol", session=self.session.id, listener=self.listener.name,
                    direction="in", event=event, data=data, local=self._local, remote=self._remote)

    def _track(self, event, **fields):
        if self.factory.events is not None:
            self.factory.events.track(event, listener=self.listener.name, client=self.client_ip,
                                      session=self.session.id, user=self.session.user, **fields)

    def connectionMade(self):
        # The limits across sessions come first: a flood costs a counter lookup and one reply.
        self.guard = limits.Guard(self.factory.anvil, self.listener, self.hostname, self.client_ip)
        refused = self.guard.connect()
        if refused is not None:
            return self._refuse_connection(*refused)
        self.session = Session(self, secrets.token_hex(6))
        # Kept now: a TLS transport cannot tell its addresses any more once it is closed.
        local, peer = self.transport.getHost(), self.transport.getPeer()
        self._local = "%s:%s" % (getattr(local, "host", ""), getattr(local, "port", ""))
        self._remote = "%s:%s" % (getattr(peer, "host", ""), getattr(peer, "port", ""))
        self._protocol_event("connect")
        self._arm("session", self.limits.session_timeout, "session time limit exceeded")
        if not policy.client_allowed(self.listener, self.client_ip):
            log.info("refused {client} on {listener}: not in allowed_ips",
                     client=self.client_ip, listener=self.listener.name)
            self._close(policy.denied_banner_reply(self.hostname))
            return
        d = self.factory.gate.wait()
        d.addCallback(lambda _: self._hook("on_connect"))
        d.addCallbacks(self._connected, self._unavailable)
        self._busy_with(d)

    def _unavailable(self, failure):
        log.failure("refusing session from {client}", failure, client=self.client_ip)
        self._close(replies.unavailable(self.hostname))

    def _connected(self, reply):
        if reply is not None and not reply.is_positive:
            if reply.is_temporary and reply.code != 421:
                reply = replies.temporary_greeting(self.hostname, reply)
            self._close(reply)
        elif self.guard.greet_delay:
            d = defer.Deferred()
            self._timers["greet"] = self.clock.callLater(self.guard.greet_delay, d.callback, None)
            return d.addCallback(lambda _: self._greet())
        else:
            self._greet()

    def _greet(self):
        self._greeted = True
        self._reply(policy.banner_reply(self.hostname))

    def _refuse_connection(self, limit, reply):
        """Over a connection limit: the reply and close, before any session exists."""
        self._closed = True
        self.transport.write(b"".join(line + b"\r\n" for line in reply.lines()))
        self.transport.loseConnection()
        if self.factory.events is not None:
            self.factory.events.track("REJECT", listener=self.listener.name, client=self.client_ip,
                                      session=None, user=None, stage="CONNECT", reply=str(reply),
                                      limit=limit)

    def _limit_refused(self, limit, reply, stage=None, counts=True):
        """Answer a limit's refusal; the REJECT event names the limit."""
        self._limit = limit
        if self._stage is None:
            self._track("REJECT", stage=stage, reply=str(reply), limit=limit)
        self._error(reply, counts)

    def _early_talker(self):
        log.info("{client} on {listener} talked before the banner",
                 client=self.client_ip, listener=self.listener.name)
        self._track("REJECT", stage="CONNECT", reply=str(replies.PROTOCOL_ERROR),
                    limit="early_talker")
        self._close(replies.PROTOCOL_ERROR)

    def connectionLost(self, reason=protocol.connectionDone):
        if self.guard is not None:
            self.guard.disconnect()
        if self.session is not None:
            self._protocol_event("disconnect")
        self._closed = True
        self._scanner = None
        self._chunk = None
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()

    # -- framing ------------------------------------------------------------------------------

    def dataReceived(self, data):
        if self._closed:
            return
        if self._scanner is not None or self._chunk is not None:
            self._arm("idle", self.limits.data_timeout, "data timeout exceeded")
            self._data_bytes += len(data)
        elif not self._greeted:
            return self._early_talker()
        self._buffer += data
        self._process()

    def _process(self):
        while not self._busy and not self._closed and (self._buffer or self._chunk_read()):
            if self._scanner is not None:
                rest = self._scanner.feed(self._buffer)
                self._buffer = b""
                if rest is None:
                    return
                self._buffer = rest
                self._busy_with(self._end_of_data())
                continue
            if self._chunk is not None:  # BDAT: exactly its octets, whatever they hold
                rest = self._chunk.feed(self._buffer)
                self._buffer = b""
                if rest is None:
                    return
                self._buffer = rest
                chunk, self._chunk = self._chunk, None
                self._busy_with(chunking.finished(self, chunk))
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_PARTIAL_LINE:
                    self._buffer = b""
                    self._close(LINE_TOO_LONG)
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            self._busy_with(self._line(line))
        if self._busy:
            if len(self._buffer) > MAX_PENDING and not self._paused:
                # A check is pending and the client keeps sending: stop reading until it is done.
                self._paused = True
                self.transport.pauseProducing()
        elif not self._closed:
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._idle()

    def _chunk_read(self):
        """A BDAT chunk with nothing (more) to read: BDAT 0 LAST ends without more bytes."""
        return self._chunk is not None and self._chunk.left == 0

    def _busy_with(self, result):
        """result is None (the command was answered) or a Deferred (answer comes later)."""
        if not isinstance(result, defer.Deferred):
            return
        self._busy = True
        self._disarm("idle")
        result.addErrback(self._unexpected)
        result.addBoth(self._done)

    def _done(self, _):
        self._busy = False
        if not self._closed:
            self._process()

    def _unexpected(self, failure):
        log.failure("unexpected error in session with {client}", failure, client=self.client_ip)
        self._reply(TEMP_FAIL)

    def _idle(self):
        if self._scanner is not None or self._chunk is not None:
            self._arm("idle", self.limits.data_timeout, "data timeout exceeded")
        else:
            self._arm("idle", self.limits.command_timeout, "command timeout exceeded")

    # -- timers (from the injected clock) -----------------------------------------------------

    def _arm(self, name, seconds, why):
        self._disarm(name)
        self._timers[name] = self.clock.callLater(seconds, self._timed_out, why)

    def _disarm(self, name):
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _timed_out(self, why):
        if self._closed:
            return
        log.info("{why} for {client} on {listener}", why=why, client=self.client_ip,
                 listener=self.listener.name)
        self._close(replies.timed_out(self.hostname, why))

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, reply):
        if self._closed:
            return
        lines = reply.lines()
        self.transport.write(b"".join(line + b"\r\n" for line in lines))
        if self.factory.events is not None:
            self._protocol_event("reply", b"\n".join(lines).decode("utf-8", "replace"))
        if self._stage is not None and reply.code >= 400:
            # Every refused MAIL, RCPT or message is a step in message tracking, naming the
            # address that was refused (the sender at MAIL, the recipient at RCPT).
            sender = str(self.sender) if self.sender is not None else self._attempt
            recipients = [self._attempt] if self._stage == "RCPT" and self._attempt else \
                [str(r) for r in self.recipients]
            extra = {"limit": self._limit} if self._limit is not None else {}
            self._track("REJECT", stage=self._stage, reply=str(reply), sender=sender,
                        recipients=recipients, **extra)

    def _error(self, reply, counts=True):
        """Answer with a failure reply; too many of them end the session."""
        self._reply(reply)
        if counts:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._stage = None  # the closing 421 is not a second rejection of this command
                self._close(replies.too_many_errors(self.hostname))

    def _answer(self, reply):
        if reply.is_positive:
            self._reply(reply)
        else:
            self._error(reply, counts=reply.code != 452)

    def _close(self, reply=None):
        if reply is not None:
            self._reply(reply)
        self._closed = True
        self._buffer = b""
        self.transport.loseConnection()

    # -- commands ----------------------------------------------------------------------------

    _stage = None  # "MAIL", "RCPT" or "DATA" while such a command is being answered
    _attempt = None  # the address given to that MAIL or RCPT, once parsed
    _limit = None  # the limit across sessions that refused it, if one did
    _tls_reported = False

    def _line(self, line):
        self._stage = None
        self._attempt = None
        self._limit = None
        if self.factory.events is not None:
            self._report_command(line)
        limit = MAX_AUTH_LINE if self._sasl is not None or line[:5].upper() == b"AUTH " else MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            return self._error(LINE_TOO_LONG)
        if self._sasl is not None:
            return self._sasl_step(line)
        if any(b < 32 or b == 127 for b in line):
            return self._error(BAD_CHAR)
        text = line.decode("latin-1")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb not in COMMANDS:
            return self._error(UNKNOWN)
        if verb in ("MAIL", "RCPT", "DATA", "BDAT"):
            self._stage = "DATA" if verb == "BDAT" else verb
        handler = getattr(self, "do_" + verb)
        try:
            return handler(arg.strip(" "))
        except ReplyError as e:
            return self._answer(e.reply)

    def _report_command(self, line):
        if self.tls and not self._tls_reported:
            # The handshake is complete once a command arrives over it.
            self._tls_reported = True
            version, cipher = self.tls_info()
            self._protocol_event("tls", "%s %s" % (version, cipher))
        if self._sasl is not None:
            text = "****"  # a SASL response: credentials
        else:
            text = line[:MAX_AUTH_LINE].decode("latin-1")
            if text[:5].upper() == "AUTH ":
                parts = text.split(" ")
                text = " ".join(parts[:2] + ["****"] * (len(parts) > 2))
        self._protocol_event("command", text)

    def _hook(self, name, *args):
        """The seam the filter chain plugs into: None (go on) or a Reply, maybe in a Deferred."""
        hooks = self.factory.hooks
        if hooks is None or not hasattr(hooks, name):
            return defer.succeed(None)
        return defer.maybeDeferred(getattr(hooks, name), self.session, *args)

    def _then(self, d, on_ok):
        """Continue with on_ok() unless the hook answered with a failure reply."""

        def decide(reply):
            if reply is not None and not reply.is_positive:
                return self._answer(reply)
            return on_ok()

        return d.addCallback(decide)

    def do_EHLO(self, arg, esmtp=True):
        helo = address.parse_helo(arg)
        self._reset_transaction()
        self.helo, self.esmtp = helo, esmtp

        def greet():
            if not esmtp:
                return self._reply(R(250, "", self.hostname))
            lines = [self.hostname, "PIPELINING", "SIZE %d" % self.listener.max_message_size,
                     "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"]
            if self.listener.tls in ("optional", "required") and not self.tls:
                lines.append("STARTTLS")
            if self.tls and self.listener.auth != "none" and self.factory.auth is not None:
                lines.append("AUTH PLAIN LOGIN")
            self._reply(R(250, "", "\n".join(lines)))

        return self._then(self._hook("on_helo"), greet)

    def do_HELO(self, arg):
        return self.do_EHLO(arg, esmtp=False)

    def do_STARTTLS(self, arg):
        if arg:
            return self._error(replies.STARTTLS_SYNTAX)
        if self.tls:
            return self._error(replies.TLS_ACTIVE)
        if self.listener.tls not in ("optional", "required") or self.factory.tls is None:
            return self._error(replies.NO_STARTTLS)
        self._reply(replies.START_TLS)
        if self._buffer:
            # Anything sent after STARTTLS but before the handshake was sent in plaintext and
            # would run inside TLS (CVE-2011-0411): drop it.
            log.warn("discarded {n} bytes pipelined after STARTTLS from {client}",
                     n=len(self._buffer), client=self.client_ip)
            self._buffer = b""
        self.transport.startTLS(self.factory.tls)
        self.tls = True
        self._tls_reported = False
        # Nothing learnt before TLS is trusted after it (RFC 3207 4.2).
        self.helo = None
        self.esmtp = False
        self.user = None
        self.cert_name, self._cert_checked = None, False
        self._reset_transaction()

    def trusted(self):
        """May relay anywhere: authenticated, or a client certificate of relay_client_certs."""
        return self.user is not None or clientcert.permitted(self) is not None

    def _tls_missing(self):
        return self.listener.tls == "required" and not self.tls

    def do_AUTH(self, arg):
        if self._tls_missing():
            return self._error(TLS_FIRST)
        if self.listener.auth == "none" or self.factory.auth is None:
            return self._error(replies.AUTH_DISABLED)
        if not self.tls:
            return self._error(AUTH_NEEDS_TLS)
        if self.helo is None or not self.esmtp:
            return self._error(replies.AUTH_NEEDS_EHLO)
        if self.user is not None:
            return self._error(replies.AUTH_AGAIN)
        if self.sender is not None:
            return self._error(replies.AUTH_IN_TRANSACTION)
        if self.guard.at_auth:
            blocked = self.guard.auth_blocked()
            if blocked is not None:
                return self._limit_refused(*blocked, stage="AUTH")
        mechanism, _, initial = arg.partition(" ")
        try:
            self._sasl = sasl.Exchange(mechanism.upper(), initial or None)
        except ReplyError as e:
            return self._error(e.reply)
        return self._sasl_advance(self._sasl.start)

    def _sasl_step(self, line):
        return self._sasl_advance(self._sasl.feed, line)

    def _sasl_advance(self, step, *args):
        """One step of the exchange: a challenge to send, or the credentials to check."""
        try:
            step = step(*args)
        except ReplyError as e:
            self._sasl = None
            return self._error(e.reply)
        if isinstance(step, str):
            return self._reply(R(334, "", step))
        self._sasl = None
        return self._check_credentials(*step)

    def _check_credentials(self, username, password):
        if self.guard.at_auth:
            blocked = self.guard.auth_blocked(username.decode("utf-8", "replace"))
            if blocked is not None:
                return self._limit_refused(*blocked, stage="AUTH")
        started = self.clock.seconds()
        d = sasl.authenticate(self.factory.auth, username, password)

        def checked(result):
            username, user = result
            if user is None:
                return self._auth_failed_after(started, username)
            self.user = user
            log.info("authenticated {user} from {client}", user=username, client=self.client_ip)
            self._reply(AUTH_OK)

        def broken(failure):
            log.failure("authentication backend failed", failure)
            self._error(AUTH_TEMP)

        return d.addCallbacks(checked, broken)

    def _auth_failed_after(self, started, username):
        """
        A failed AUTH is answered auth_failure_delay after it began, whatever the backend took:
        an unknown user and a wrong password look alike, and guessing is slow.
        """
        self.guard.auth_failed(username)
        wait = started + self.limits.auth_failure_delay - self.clock.seconds()
        if wait <= 0:
            return self._auth_failed(username)
        d = defer.Deferred()
        self._timers["auth"] = self.clock.callLater(wait, d.callback, None)
        return d.addCallback(lambda _: self._auth_failed(username))

    def _auth_failed(self, username):
        self.auth_failures += 1
        self._track("AUTH_FAIL", user_attempted=username)
        log.info("authentication failed for {user} from {client}", user=username, client=self.client_ip)
        self._reply(AUTH_BAD)
        if self.auth_failures >= self.limits.max_auth_failures:
            self._close(replies.too_many_auth_failures(self.hostname))

    def do_MAIL(self, arg):
        if self._tls_missing():
            return self._error(TLS_FIRST)
        if self.helo is None:
            return self._error(BAD_SEQUENCE_HELO)
        if self.sender is not None:
            return self._error(NESTED_MAIL)
        if self.listener.auth == "required" and self.user is None:
            return self._error(AUTH_FIRST)
        sender, params = address.parse_mail(arg)
        self._attempt = str(sender)
        if params.get("SIZE", 0) > self.listener.max_message_size:
            return self._error(TOO_BIG)
        if self.guard.at_mail:
            refused = self.guard.mail(self.user.name if self.user is not None else None)
            if refused is not None:
                return self._limit_refused(*refused)
        refused = policy.sender_reply(self.user, sender)
        if refused is not None:
            return self._answer(refused)

        def accept():
            self.sender = sender
            self.body_type = params.get("BODY", "7BIT").upper()
            self.mail_params = params
            self._reply(replies.SENDER_OK)

        return self._then(self._hook("on_mail", sender), accept)

    def do_RCPT(self, arg):
        if self._tls_missing():
            return self._error(TLS_FIRST)
        if self.sender is None:
            return self._error(NEED_MAIL)
        recipient, params = address.parse_rcpt(arg, self.mail_params.get("SMTPUTF8", False))
        self._attempt = str(recipient)
        if self.guard.at_rcpt:
            refused = self.guard.rcpt(self.user.name if self.user is not None else None)
            if refused is not None:
                return self._limit_refused(*refused, counts=False)
        if len(self.recipients) >= self.listener.max_recipients:
            return self._answer(TOO_MANY_RCPTS)
        refused = policy.recipient_reply(self.listener, self.factory.gateway, self.client_ip,
                                         self.trusted(), recipient)
        if refused is not None:
            return self._answer(refused)
        rcpt = str(recipient) if recipient.domain else "postmaster@" + self._postmaster_domain()

        def accept():
            if rcpt not in self.recipients:
                self.recipients.append(rcpt)
                self.rcpt_params[rcpt] = params
            self._reply(replies.RECIPIENT_OK)

        def validated(refused):  # a listener's recipients = ldap: before the filters' say
            return refused if refused is not None else self._hook("on_rcpt", recipient)

        return self._then(check_recipient(self.factory, recipient).addCallback(validated), accept)

    def _postmaster_domain(self):
        domains = self.factory.gateway.accepted_domains
        return domains[0] if domains else self.hostname

    def do_DATA(self, arg):
        if self._tls_missing():
            return self._error(TLS_FIRST)
        if arg:
            return self._error(replies.DATA_SYNTAX)
        if self.sender is None:
            return self._error(NEED_MAIL)
        if not self.recipients:
            return self._error(NO_RCPT)
        if self.bdat is not None:
            return self._error(chunking.DATA_AFTER_BDAT)
        self._scanner = DataScanner(self.listener.max_message_size)
        self._disarm("idle")
        self._arm("idle", self.limits.data_timeout, "data timeout exceeded")
        if self.guard.min_data_rate:
            self._data_bytes = 0
            self._arm_data_rate(self.clock.seconds())
        self._reply(replies.START_DATA)

    def _arm_data_rate(self, started):
        self._timers["rate"] = self.clock.callLater(limits.DATA_RATE_INTERVAL, self._check_data_rate,
                                                    started)

    def _check_data_rate(self, started):
        if self._closed or self._scanner is None:
            return
        refused = self.guard.data_rate(self._data_bytes, self.clock.seconds() - started)
        if refused is None:
            return self._arm_data_rate(started)
        log.info("{client} on {listener}: DATA slower than min_data_rate", client=self.client_ip,
                 listener=self.listener.name)
        self._stage, self._limit = "DATA", refused[0]
        self._close(refused[1])

    def do_BDAT(self, arg):
        unframed = chunking.start(self, arg)
        if unframed is not None:
            return self._close(unframed)  # no size: what follows cannot be told from commands
        self._arm("idle", self.limits.data_timeout, "data timeout exceeded")

    def _end_of_data(self, scanner=None):
        """The message is complete: DATA's scanner, or the scanner of BDAT's chunks."""
        self._stage = "DATA"
        self._data_done_at = self.clock.seconds()
        if scanner is None:
            scanner, self._scanner = self._scanner, None
        self._disarm("idle")
        self._disarm("rate")
        message = scanner.message()
        reply = scan_problem(scanner)
        if reply is None:
            refused = self.guard.hops(message)
            if refused is not None:
                self._limit, reply = refused
        if reply is not None:
            log.info("rejected message from {client}: {reply}", client=self.client_ip, reply=str(reply))
            self._error(reply)  # reported while the transaction still names its recipients
            self._reset_transaction()
            return None
        envelope = self._envelope(scanner.size)
        d = self._hook("on_data", envelope, message)
        strip = inbound_patterns(self.listener, self.factory.gateway)
        d.addCallback(lambda result: hand_off(self.factory.queue, self.hostname, envelope, message,
                                              result, strip))
        d.addCallback(self._handed_off)
        d.addErrback(self._queue_failed, envelope)
        d.addBoth(self._after_message)
        return d

    def _handed_off(self, outcome):
        """outcome: a refusing Reply from the filters, or the Queued message."""
        if isinstance(outcome, Reply):
            return self._answer(outcome)
        self._stage = None  # the 250 is not a rejection
        envelope = outcome.envelope
        fields = outcome.tracking(latency=self.clock.seconds() - self._data_done_at)
        self._track("RECEIVE", **fields)
        if outcome.state == "quarantine":
            self._track("QUARANTINE", reason=outcome.reason, **fields)
        log.info("queued {queue_id} from=<{sender}> nrcpt={nrcpt} size={size} client={client} "
                 "state={state}", queue_id=outcome.queue_id, sender=envelope.sender,
                 nrcpt=len(envelope.recipients), size=envelope.size, client=envelope.client_ip,
                 state=outcome.state, session=self.session.id)
        self._reply(replies.queued(outcome.queue_id))

    def _queue_failed(self, failure, envelope):
        if failure.check(QueueUnavailable):  # an outage: one line each, not a traceback each
            log.error("could not queue message {queue_id}: {error}", queue_id=envelope.queue_id,
                      error=failure.getErrorMessage())
        elif failure.check(OSError):  # a full disk, an I/O error: the queue logged it, one line
            log.warn("message {queue_id} not queued ({error}): 451", queue_id=envelope.queue_id,
                     error=failure.getErrorMessage())
        else:
            log.failure("could not queue message {queue_id}", failure, queue_id=envelope.queue_id)
        self._error(TEMP_FAIL)

    def _after_message(self, result):
        self._reset_transaction()
        return result

    def _envelope(self, size):
        version, cipher = self.tls_info()
        return Envelope(
            queue_id=self.factory.new_queue_id(), sender=str(self.sender),
            recipients=tuple(self.recipients), client_ip=self.client_ip,
            client_port=self.client_port, helo=self.helo, listener=self.listener.name,
            user=self.user.name if self.user is not None else None,
            tls_version=version, tls_cipher=cipher, protocol=self._protocol_name(),
            received_at=self.clock.seconds(), size=size, body=self.body_type,
            **esmtp.envelope_fields(self.mail_params, self.rcpt_params))

    def _protocol_name(self):
        if not self.esmtp:
            return "SMTP"
        # RFC 3848 / RFC 6531 4.3: UTF8SMTP for an SMTPUTF8 transaction.
        base = "UTF8SMTP" if self.mail_params.get("SMTPUTF8") else "ESMTP"
        return base + ("S" if self.tls else "") + ("A" if self.user is not None else "")

    def do_RSET(self, arg):
        self._reset_transaction()
        self._reply(OK)

    def do_NOOP(self, arg):
        self._reply(OK)

    def do_VRFY(self, arg):
        self._reply(replies.VRFY)

    def do_EXPN(self, arg):
        self._error(replies.NO_EXPN)

    def do_HELP(self, arg):
        self._reply(replies.HELP)

    def do_QUIT(self, arg):
        self._close(replies.BYE)

    def _reset_transaction(self):
        self.sender = None
        self.recipients = []
        self.body_type = "7BIT"
        self.mail_params = {}  # MAIL's ESMTP parameters (mailgate.smtp.params)
        self.bdat = None  # the ChunkScanner of a transaction sending BDAT chunks
        self.bdat_declared = 0  # octets announced by its chunks so far
        self.rcpt_params = {}  # recipient (as stored) -> its RCPT parameters
        if self.session is not None:
            self.session.transaction.clear()


class SMTPFactory(protocol.ServerFactory):
    """
    Builds sessions for one listener.  Everything a session needs comes in here: no globals.

    hooks is the seam for the filter chain: an object with any of on_connect(session),
    on_helo(session), on_mail(session, sender), on_rcpt(session, recipient),
    on_data(session, envelope, message), each returning None or a Reply (or a Deferred of one);
    on_data may also return a mailgate.verdict.DataResult (the bytes to queue and their state).
    session is a mailgate.session.Session; message excludes our Received header.
    """

    protocol = SMTPServer
    noisy = False  # mailgate logs its own listener events

    def __init__(self, listener, gateway, clock, queue, new_queue_id, auth=None, tls=None, hooks=None,
                 events=None, anvil=None, recipients=None, client_certs=None):
        self.listener = listener
        self.gateway = gateway
        self.clock = clock
        self.queue = queue
        self.new_queue_id = new_queue_id
        self.auth = auth
        self.tls = tls
        self.hooks = hooks
        self.events = events  # a mailgate.events.EventBus, or None
        # The counters across sessions: the gateway shares one among all its listeners.
        self.anvil = anvil if anvil is not None else Anvil(clock)
        self.recipients = recipients  # an IRecipientValidator for recipients = ldap, or None
        self.client_certs = client_certs  # a clientcert.ClientCertificates, or None
        self.gate = Gate()

    def buildProtocol(self, addr):
        p = self.protocol(self)
        return p
