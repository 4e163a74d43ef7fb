"""
The admin channel: how `mailgate queue ...` and `mailgate reload` reach the running gateway.

A unix socket ([admin] socket, default admin.sock in the [queue] path; mode 0600, so only the
gateway's user may use it) made when the gateway starts and removed when it stops.  A gateway
refuses to start when another one answers on that socket; a socket nobody answers on is stale
(a crash) and replaced; any other file there is left alone and refuses the start.  A path too
long for a unix socket (over 107 bytes) is logged as an error and the gateway runs without the
channel (receiving and delivering mail matters more than queue commands).

The protocol is one JSON object per line each way, answered in order:

    {"command": "list", "state": null}       {"ok": true, "now": T, "messages": [MESSAGE...]}
    {"command": "show", "id": "ID"}          {"ok": true, "now": T, "message": MESSAGE+headers}
    {"command": "flush", "id": null}         {"ok": true, "flushed": [ID...]}
    {"command": "hold" | "release" | "delete" | "bounce", "id": "ID"}   {"ok": true, ...}
    {"command": "reload"}                    {"ok": true, "reloaded": SUMMARY}
    anything that fails                      {"ok": false, "error": "one line"}

MESSAGE: id, state (the spool's: active, deferred, hold, quarantine), size, received_at, sender,
client_ip, helo, listener, user, protocol, tls_version, verdicts, attempts, next_attempt,
recipients: [{address, outcome (pending, deferred, delivered, bounced), code, status, text,
remote, at}] and lease: {node, until} while a delivery (on this node or, with a shared queue,
another) holds the message, else null.

The queue operations are mailgate.delivery.scheduler.DeliveryService's, so that they agree with delivery
rounds and timers.  The client half (request(), and the `mailgate queue` / `mailgate reload`
commands) uses plain blocking sockets: no reactor in the CLI.
"""

import datetime
import json
import os
import socket
import stat

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from mailgate.config import config_file
from mailgate.errors import ConfigError

log = Logger()

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 64 * 1024
MAX_UNIX_PATH = 107  # bytes: sun_path is 108 on Linux, with its terminating NUL
STATES = ("active", "deferred", "hold", "quarantine")
CLI_STATES = {"active": "active", "deferred": "deferred", "held": "hold", "hold": "hold",
              "quarantine": "quarantine"}
SHOWN_STATE = {"hold": "held"}  # the command line says "held" for the spool's "hold"
OPERATIONS = ("flush", "hold", "release", "delete", "bounce")
CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 900.0  # a bounce waits for a delivery round in progress (up to a data timeout)


def socket_path(config):
    """Where the admin socket of config is: [admin] socket, or admin.sock in the [queue] path."""
    if config.admin.socket:
        return config.admin.socket
    return os.path.join(config.queue.path, SOCKET_NAME)


# --- the server --------------------------------------------------------------------------------


class AdminService(service.Service):
    """Listens on the admin socket while the gateway runs (a child of the GatewayService)."""

    name = "admin"

    def __init__(self, config, reactor, gateway, clock=None):
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor  # "now" in answers (message ages)
        self.gateway = gateway
        self.path = socket_path(config)
        self.port = None

    def startService(self):
        service.Service.startService(self)
        path = self.path
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            # Not worth refusing mail for: the gateway runs, without queue commands and reload.
            log.error("admin channel disabled: {path} is too long for a unix socket (at most "
                      "{limit} bytes); set a shorter [admin] socket", path=path, limit=MAX_UNIX_PATH)
            return None
        self._claim(path)
        factory = AdminFactory(Commands(self.gateway, self.clock))
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, path, mode=0o600, wantPID=False)
        failed = []
        d = endpoint.listen(factory)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            reason = failed[0].value
            why = reason.socketError if isinstance(reason, CannotListenError) else reason
            raise self._error("cannot listen on %s: %s" % (path, getattr(why, "strerror", None) or why))
        return d

    def _error(self, message):
        return ConfigError(self.config.path, "admin", "socket", message)

    def _claim(self, path):
        """Refuse a socket another gateway answers on; remove a stale one (left by a crash)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._error("cannot use %s: %s" % (path, e.strerror))
        if not stat.S_ISSOCK(mode):
            raise self._error("%s exists and is not a socket (not removed)" % (path,))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale admin socket {path}", path=path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        except OSError as e:
            raise self._error("cannot use %s: %s" % (path, e.strerror or e))
        finally:
            probe.close()
        raise self._error("another gateway is already running: it answers on %s" % (path,))

    def _listening(self, port):
        self.port = port
        log.info("admin channel listening on {path}", path=self.path)
        return port

    def stopService(self):
        service.Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # removes the socket file

    def reconfigure(self, config):
        """A reload: the socket stays where it is until the next start."""
        if socket_path(config) != self.path:
            log.warn("[admin] socket changed to {new}: the admin channel stays on {path} until the "
                     "gateway restarts", new=socket_path(config), path=self.path)
        self.config = config


class AdminProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self):
        self._last = defer.succeed(None)  # answers go out in the order of the requests

    def lineReceived(self, line):
        self._last.addCallback(lambda _: self.factory.commands.answer(line.rstrip(b"\r")))
        self._last.addCallback(self._send)

    def _send(self, response):
        self.sendLine(json.dumps(response, sort_keys=True).encode("utf-8"))

    def lineLengthExceeded(self, line):
        self._send({"ok": False, "error": "request longer than %d bytes" % (MAX_REQUEST,)})
        self.transport.loseConnection()


class AdminFactory(protocol.ServerFactory):
    protocol = AdminProtocol
    noisy = False

    def __init__(self, commands):
        self.commands = commands


class Commands:
    """Answers admin requests for a GatewayService (its queue, delivery and reload)."""

    def __init__(self, gateway, clock):
        self.gateway = gateway
        self.clock = clock

    def answer(self, line):
        """A response dict (in a Deferred) for one request line; never fails."""
        try:
            request = json.loads(line.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return defer.succeed({"ok": False, "error": "bad request (%s): expected one JSON "
                                  "object per line" % (e,)})
        command = request.get("command")
        handler = getattr(self, "do_" + command, None) if isinstance(command, str) else None
        if handler is None:
            return defer.succeed({"ok": False, "error": "unknown command %r" % (command,)})
        d = defer.maybeDeferred(handler, request)
        d.addCallback(lambda result: dict(result, ok=True))
        d.addErrback(self._failed, command, request)
        return d

    def _failed(self, failure, command, request):
        from mailgate.queue.spool import CorruptEntryError
        from mailgate.delivery.scheduler import QueueCommandError

        error = failure.value
        if isinstance(error, CorruptEntryError):
            message = str(error)
        elif isinstance(error, KeyError):
            message = "no message %s in the queue" % (request.get("id"),)
        elif isinstance(error, (QueueCommandError, ValueError, ConfigError)):
            message = str(error)
        else:
            log.failure("admin command {command} failed", failure, command=command)
            message = "internal error: %s: %s" % (type(error).__name__, error)
        return {"ok": False, "error": " ".join(message.split())}

    # -- the commands ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def do_list(self, request):
        state = request.get("state")
        if state is not None:
            state = CLI_STATES.get(state) if isinstance(state, str) else None
            if state is None:
                raise ValueError("unknown state %r (one of active, deferred, held, quarantine)"
                                 % (request.get("state"),))
        queue = self.gateway.queue
        entries = yield queue.list(state)
        holders = yield _holders(queue, [envelope.queue_id for _, envelope in entries])
        messages = []
        for where, envelope in entries:
            try:
                raw = yield queue.load_state(envelope.queue_id)
            except KeyError:
                raw = None
            messages.append(describe(where, envelope, raw, holders.get(envelope.queue_id)))
        return {"now": self.clock.seconds(), "messages": messages}

    @defer.inlineCallbacks
    def do_show(self, request):
        queue_id = _queue_id(request)
        where, envelope, data = yield self.gateway.queue.load(queue_id)
        raw = yield self.gateway.queue.load_state(queue_id)
        holders = yield _holders(self.gateway.queue, [queue_id])
        message = describe(where, envelope, raw, holders.get(queue_id))
        message["headers"] = _headers(data)
        return {"now": self.clock.seconds(), "message": message}

    def _delivery(self):
        delivery = self.gateway.delivery
        if delivery is None:
            raise ValueError("this gateway does not deliver (receive only)")
        if not delivery.running:
            raise ValueError("the gateway is still starting (queue recovery): try again")
        return delivery

    def do_flush(self, request):
        queue_id = request.get("id")
        return self._delivery().flush(_queue_id(request) if queue_id is not None else None)

    def do_hold(self, request):
        return self._delivery().hold(_queue_id(request))

    def do_release(self, request):
        return self._delivery().release(_queue_id(request))

    def do_delete(self, request):
        return self._delivery().delete(_queue_id(request))

    def do_bounce(self, request):
        return self._delivery().bounce(_queue_id(request))

    @defer.inlineCallbacks
    def do_reload(self, request):
        summary = yield self.gateway.reload()
        return {"reloaded": summary}


def _queue_id(request):
    queue_id = request.get("id")
    if not isinstance(queue_id, str) or not queue_id:
        raise ValueError("a queue id is required")
    return queue_id


def _holders(queue, queue_ids):
    """{queue_id: (node, until)} of the messages a delivery holds now ({} for a plain IQueue)."""
    from mailgate.interfaces import IWorkSource

    if not queue_ids or not IWorkSource.providedBy(queue):
        return defer.succeed({})
    return queue.holders(queue_ids)


def describe(state, envelope, raw_state, holder=None):
    """
    The JSON-able description of one queued message (see the module docstring); holder is
    (node, lease until or None) while a delivery holds it.
    """
    from mailgate.queue.state import DeliveryState as MessageState

    try:
        msg = MessageState.from_bytes(raw_state, envelope)
    except (ValueError, TypeError, KeyError):
        msg = MessageState.new(envelope)  # an unreadable state: show the envelope at least
    recipients = []
    for address in dict.fromkeys(envelope.recipients):
        status = msg.recipients.get(address) or {"outcome": "pending"}
        recipients.append({
            "address": address, "outcome": status.get("outcome", "pending"),
            "code": status.get("code"), "status": status.get("status"), "text": status.get("text"),
            "remote": status.get("remote"), "at": status.get("at"),
        })
    return {
        "id": envelope.queue_id, "state": state, "size": envelope.size,
        "received_at": envelope.received_at, "sender": envelope.sender,
        "client_ip": envelope.client_ip, "helo": envelope.helo, "listener": envelope.listener,
        "user": envelope.user, "protocol": envelope.protocol, "tls_version": envelope.tls_version,
        "verdicts": [list(v) for v in envelope.verdicts], "attempts": msg.attempts,
        "next_attempt": msg.next_attempt or None, "recipients": recipients,
        "lease": None if holder is None else {"node": holder[0], "until": holder[1]},
    }


def _headers(data):
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


# --- the client ----------------------------------------------------------------------------------


class NotRunning(Exception):
    """Nobody answers on the admin socket."""

    def __init__(self, path):
        Exception.__init__(self, path)
        self.path = path

    def __str__(self):
        return "no gateway is running (no admin socket at %s)" % (self.path,)


class AdminError(Exception):
    """The admin channel could not be used (str: one line)."""


def request(path, message, timeout=ANSWER_TIMEOUT):
    """Send one request (a dict) to the gateway at path and return its response (a dict)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(CONNECT_TIMEOUT)
        try:
            client.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NotRunning(path) from None
        except OSError as e:
            raise AdminError("cannot connect to %s: %s" % (path, e.strerror or e)) from None
        client.settimeout(timeout)
        try:
            client.sendall(json.dumps(message).encode("utf-8") + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    raise AdminError("the gateway closed the admin connection without answering")
                answer += chunk
        except socket.timeout:
            raise AdminError("no answer from the gateway within %gs" % (timeout,)) from None
        except OSError as e:
            raise AdminError("admin connection to %s failed: %s" % (path, e.strerror or e)) from None
    finally:
        client.close()
    try:
        return json.loads(answer.decode("utf-8"))
    except ValueError as e:
        raise AdminError("unreadable answer from the gateway: %s" % (e,)) from None


def socket_for(config_path):
    """
    The admin socket named by the config file.  A file the full loader refuses (being fixed
    for a reload, say) is read leniently for [admin] socket and [queue] path alone, so that the
    running gateway can still be reached; a ConfigError when even that fails.
    """
    from mailgate.config import load_config

    try:
        return socket_path(load_config(config_path))
    except ConfigError as error:
        path = _lenient_socket(config_path)
        if path is None:
            raise error
        return path


def _lenient_socket(config_path):
    import configparser

    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0",
                                       inline_comment_prefixes=("#",))
    try:
        with open(config_path, encoding="utf-8-sig") as f:
            parser.read_string(f.read())
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    base = os.path.dirname(os.path.abspath(config_path))
    value = parser.get("admin", "socket", fallback="").strip()
    if value:
        return os.path.normpath(os.path.join(base, value))
    queue = parser.get("queue", "path", fallback="/var/spool/mailgate").strip() or "/var/spool/mailgate"
    return os.path.join(os.path.normpath(os.path.join(base, queue)), SOCKET_NAME)


def _ask(args, message):
    """(response, None) or (None, error line)."""
    try:
        path = socket_for(config_file(getattr(args, "config", None)))
        response = request(path, message)
    except (ConfigError, NotRunning, AdminError) as e:
        return None, str(e)
    if not response.get("ok"):
        return None, response.get("error") or "the gateway refused the request"
    return response, None


def cli_queue(args, out, fail):
    """`mailgate queue ACTION ...`: out(text) prints, fail(text) reports an error (returns 1)."""
    action = args.action
    message = {"command": action}
    if action == "list":
        message["state"] = getattr(args, "state", None)
    elif action == "flush":
        message["id"] = getattr(args, "id", None)
    else:
        message["id"] = args.id
    response, error = _ask(args, message)
    if error is not None:
        return fail(error)
    as_json = getattr(args, "json", False)
    if action == "list":
        if as_json:
            out(json.dumps(response["messages"], indent=2, sort_keys=True))
        else:
            out(format_list(response["messages"], response["now"], getattr(args, "state", None)))
    elif action == "show":
        if as_json:
            out(json.dumps(response["message"], indent=2, sort_keys=True))
        else:
            out(format_show(response["message"], response["now"]))
    else:
        out(_done(action, response))
    return 0


def cli_reload(args, out, fail):
    """`mailgate reload`: 0 once the gateway applied the file, 1 (and its one-line error) if not."""
    response, error = _ask(args, {"command": "reload"})
    if error is not None:
        return fail(error)
    summary = response["reloaded"]
    listeners = summary.get("listeners", {})
    changes = ["%s %s" % (what, ", ".join(listeners[what])) for what in ("added", "removed", "changed")
               if listeners.get(what)]
    out("%s: reloaded%s" % (summary.get("path"), "; listeners " + "; ".join(changes) if changes else ""))
    return 0


def _done(action, response):
    queue_id = response.get("queue_id")
    if action == "flush":
        flushed = response.get("flushed", [])
        return "flushed %d message%s: retrying now" % (len(flushed), "" if len(flushed) == 1 else "s")
    if action == "hold":
        if response.get("from") == "hold":
            return "%s: already held" % (queue_id,)
        return "%s: held (was %s)" % (queue_id, response.get("from"))
    if action == "release":
        return "%s: released from %s" % (queue_id, SHOWN_STATE.get(response["from"], response["from"]))
    if action == "delete":
        return "%s: deleted" % (queue_id,)
    bounced = response.get("bounced", [])
    text = "%s: bounced %d recipient%s" % (queue_id, len(bounced), "" if len(bounced) == 1 else "s")
    if response.get("dsn"):
        text += "; notice to the sender queued as %s" % (response["dsn"],)
    return text


# --- formatting ----------------------------------------------------------------------------------


def human_size(size):
    """1234 -> "1.2K", 35000 -> "34K", 3.4 MiB -> "3.4M"; under 1K: the bytes."""
    if size < 1024:
        return "%d" % size
    value = float(size)
    for unit in "KMGT":
        value /= 1024.0
        if value < 9.95:
            return "%.1f%s" % (value, unit)
        if value < 1023.5 or unit == "T":
            return "%d%s" % (round(value), unit)
    return "%dT" % round(value)  # not reached


def human_age(seconds):
    """42 -> "42s", 300 -> "5m", 7200 -> "2h", 3 days -> "3d" (rounded down)."""
    seconds = max(0, int(seconds))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return "%d%s" % (seconds // length, unit)
    return "%ds" % seconds


def _summary_size(size):
    if size < 1024:
        return "%d bytes" % size
    text = human_size(size)
    return "%s %s" % (text[:-1], text[-1])


_COLUMNS = "%-17s %6s %5s %-10s %s"
_INDENT = " " * len(_COLUMNS % ("", "", "", "", ""))


def format_list(messages, now, state=None):
    """The `mailgate queue list` table (like postqueue -p) and its summary line."""
    if not messages:
        if state:
            return "No %s messages" % (SHOWN_STATE.get(CLI_STATES.get(state, state), state),)
        return "Mail queue is empty"
    lines = [_COLUMNS % ("Queue ID", "Size", "Age", "State", "Sender/Recipients")]
    total = 0
    for message in messages:
        total += message["size"]
        lines.append(_COLUMNS % (
            message["id"], human_size(message["size"]), human_age(now - message["received_at"]),
            SHOWN_STATE.get(message["state"], message["state"]), message["sender"] or "<>"))
        if message.get("lease"):
            lines.append(_INDENT + "(being delivered by %s)" % (_lease(message["lease"], now),))
        for rcpt in message["recipients"]:
            if rcpt["outcome"] not in ("pending", "deferred"):
                continue  # done with: postqueue shows only what is still to be delivered
            lines.append(_INDENT + rcpt["address"])
            if rcpt["outcome"] == "deferred" and rcpt.get("text"):
                lines.append(_INDENT + "  (%s)" % (_reply(rcpt),))
        lines.append("")
    count = len(messages)
    lines.append("-- %s in %d request%s." % (_summary_size(total), count, "" if count == 1 else "s"))
    return "\n".join(lines)


def _lease(lease, now):
    if lease.get("until"):
        return "%s, lease for %s more" % (lease["node"], human_age(lease["until"] - now))
    return lease["node"]


def _reply(rcpt):
    parts = [str(rcpt["code"]) if rcpt.get("code") else "", rcpt.get("status") or "", rcpt.get("text") or ""]
    text = " ".join(p for p in parts if p)
    if rcpt.get("remote"):
        text += " [%s]" % (rcpt["remote"],)
    return text


def _when(timestamp, now):
    if not timestamp:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    delta = now - timestamp
    relative = "%s ago" % human_age(delta) if delta >= 0 else "in %s" % human_age(-delta)
    return "%s (%s)" % (moment.strftime("%Y-%m-%d %H:%M:%S UTC"), relative)


def format_show(message, now):
    """`mailgate queue show ID`: the envelope, per-recipient status, and the headers."""
    lines = [
        "Queue ID:    %s" % message["id"],
        "State:       %s" % SHOWN_STATE.get(message["state"], message["state"]),
        "Size:        %s (%d bytes)" % (human_size(message["size"]), message["size"]),
        "Arrived:     %s" % _when(message["received_at"], now),
        "Sender:      <%s>" % message["sender"],
    ]
    client = message.get("client_ip") or "local"
    if message.get("helo"):
        client += " (helo %s)" % message["helo"]
    if message.get("listener"):
        client += " on listener %s" % message["listener"]
    if message.get("protocol"):
        client += ", %s" % message["protocol"]
    if message.get("tls_version"):
        client += ", %s" % message["tls_version"]
    lines.append("Client:      %s" % client)
    if message.get("user"):
        lines.append("User:        %s" % message["user"])
    if message.get("verdicts"):
        lines.append("Verdicts:    %s" % ", ".join("%s=%s" % tuple(v[:2]) for v in message["verdicts"]))
    attempts = "%d" % message.get("attempts", 0)
    if message.get("next_attempt") and message["state"] == "deferred":
        attempts += "; next %s" % _when(message["next_attempt"], now)
    lines.append("Attempts:    %s" % attempts)
    if message.get("lease"):
        lines.append("Delivering:  %s" % (_lease(message["lease"], now),))
    lines.append("Recipients:")
    for rcpt in message["recipients"]:
        lines.append("  %s" % rcpt["address"])
        status = rcpt["outcome"]
        if rcpt.get("code") or rcpt.get("text"):
            status += ": %s" % _reply(rcpt)
        if rcpt.get("at"):
            status += " (%s ago)" % human_age(now - rcpt["at"])
        lines.append("      %s" % status)
    lines.append("Headers:")
    lines += ["  " + line for line in message.get("headers", "").split("\n")]
    return "\n".join(lines)
