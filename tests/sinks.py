"""
A programmable SMTP sink for tests: a plain-socket server on 127.0.0.1 (or ::1) in background
threads, so it works from trial tests, plain pytest tests and end-to-end tests that drive a
separate gateway process alike.  Standard library only; no Twisted, no mailgate.

    sink = Sink(rcpt={"bad@example.test": (550, "5.1.1 No such user")})
    port = sink.start()
    ...                                 # deliver to 127.0.0.1:port
    sink.wait_for_messages(1)           # for other processes: waits (no sleeping), False on timeout
    sink.messages[0]["message"]         # unstuffed bytes; "data" is the raw dot-stuffed wire bytes
    sink.stop()

Each message is a dict: mail_from (str, "" for <>), rcpt_to (the accepted recipients), data (raw
bytes between the 354 and the final ".CRLF", as received: dot-stuffed), message (unstuffed),
tls (protocol version or None), auth ((user, password) or None), helo, client_cert (the CN of a
verified client certificate, when the sink asked for one), connection (its index, from 0),
mail_params (the text after MAIL's path, "" for none), rcpt_params ({address: text after the
path}), via ("DATA" or "BDAT") and chunks (the sizes of the BDAT chunks).
Only transactions answered 2xx after the final dot are in messages; every DATA transaction is in
transactions.  sink.connections counts accepted connections; sink.commands lists (connection,
line) for every command line received (not DATA lines), sink.commands_of(i) those of one
connection; sink.auth_attempts (connection, user, password, tls) every AUTH.  sink.errors holds
the traceback of any session that died of a bug in the sink (a client going away is no error).
`with Sink(...) as sink:` starts and stops it.

Behaviour (keyword arguments; per_connection=[{...}, {...}] overrides them for the 1st, 2nd, ...
connection, later ones use the base behaviour):

    banner=(220, "sink.test ESMTP")   the greeting; a 4xx/5xx banner answers every command but QUIT
                                      with 503 (421: closes at once)
    ehlo_reply=None                   (code, text) to answer EHLO with instead of 250
    starttls=False, cert=, key=       advertise STARTTLS and wrap with the ssl module after the 220
    starttls_reply=(220, "2.0.0 Ready to start TLS")
    starttls_garbage=False            after the 220, send garbage instead of a TLS handshake
    inject_after_starttls=None        bytes sent in the same send() as the 220 (STARTTLS response
                                      injection, CVE-2011-0411 class), then the handshake
    client_ca=None                    ask for a client certificate, verify it against this CA file
    auth=None                         True: advertise AUTH (auth_mechanisms) and accept any
                                      credentials; (user, password): accept only those (535 else)
    auth_mechanisms="PLAIN LOGIN"
    auth_needs_tls=False              advertise AUTH only inside TLS
    eightbitmime=True                 advertise 8BITMIME
    smtputf8=False, dsn=False         advertise SMTPUTF8, DSN (their parameters are accepted either
                                      way and recorded in mail_params / rcpt_params)
    chunking=False                    advertise CHUNKING and take BDAT (always understood)
    mail_reply=(250, "2.1.0 Ok")
    rcpt={"addr": (550, "5.1.1 No such user")}, rcpt_default=(250, "2.1.5 Ok")
    data_start_reply=(354, "End data with <CR><LF>.<CR><LF>")
    data_reply=(250, "2.0.0 Ok: queued")    the reply after the final dot
    drop_after=None                   a stage: "CONNECT", "EHLO", "HELO", "STARTTLS", "TLS" (after
                                      the 220 to STARTTLS, before the handshake), "AUTH", "MAIL",
                                      "RCPT", "DATA" (before the 354), "DOT" (after the final dot,
                                      before the reply), "QUIT": close the socket there
    hang=False                        True: accept and never answer; or a stage name as above:
                                      stop answering there (the client must time out)
    hangup_after_messages=None        N: close the connection right after the reply to the Nth
                                      final dot (a server that ends idle sessions at once)
    drop_after_messages=None          N: after N messages, close the connection when the next
                                      command arrives, without answering it (a connection kept
                                      open by the client that the server has let go)
"""

import base64
import socket
import socketserver
import ssl
import threading
import traceback

DEFAULTS = dict(
    banner=(220, "sink.test ESMTP"),
    ehlo_reply=None,
    starttls=False,
    cert=None,
    key=None,
    starttls_reply=(220, "2.0.0 Ready to start TLS"),
    starttls_garbage=False,
    inject_after_starttls=None,
    client_ca=None,
    auth=None,
    auth_mechanisms="PLAIN LOGIN",
    auth_needs_tls=False,
    eightbitmime=True,
    smtputf8=False,
    dsn=False,
    chunking=False,
    mail_reply=(250, "2.1.0 Ok"),
    rcpt=None,
    rcpt_default=(250, "2.1.5 Ok"),
    data_start_reply=(354, "End data with <CR><LF>.<CR><LF>"),
    data_reply=(250, "2.0.0 Ok: queued"),
    drop_after=None,
    hang=False,
    hangup_after_messages=None,
    drop_after_messages=None,
)

SOCKET_TIMEOUT = 30.0  # a safety net only: stop() closes every socket
MAX_LINE = 1024 * 1024


class _Closed(Exception):
    """The client went away (or we were told to stop): end the session quietly."""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = True  # server_close() joins the session threads

    def __init__(self, sink, address, family):
        self.address_family = family
        self.sink = sink
        socketserver.ThreadingTCPServer.__init__(self, address, _Handler)

    def process_request(self, request, client_address):
        # Runs in the serving thread, in accept order: number the connections here (and register
        # the socket for stop()).  The index travels with the client address to the handler.
        index = self.sink._accepted(request)
        socketserver.ThreadingTCPServer.process_request(self, request, (client_address, index))

    def handle_error(self, request, client_address):
        pass  # a client vanishing mid-session is normal here


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sink = self.server.sink
        _, index = self.client_address
        session = _Session(sink, self.request, index)
        try:
            session.run()
        except (_Closed, OSError, ssl.SSLError):
            pass  # the client went away, or stop()
        except Exception:
            sink._error(traceback.format_exc())
        finally:
            session.close()
            sink._finished(index)


class _Session:
    def __init__(self, sink, sock, index):
        self.sink = sink
        self.sock = sock
        self.index = index
        self.b = sink.behaviour(index)
        self.messages_here = 0  # DATA transactions on this connection
        self.buffer = b""
        self.tls = None
        self.client_cert = None
        self.helo = None
        self.auth = None
        self.reset()

    def reset(self):
        self.mail_from = None
        self.mail_params = ""
        self.rcpt_to = []
        self.rcpt_params = {}
        self.chunks = []
        self.bdat_data = []

    # -- I/O

    def send(self, data):
        self.sock.sendall(data)

    def reply(self, code, text="", extra=b""):
        lines = text.split("\n") if text else [""]
        out = b""
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out += ("%03d%s%s\r\n" % (code, sep, line)).encode("utf-8")
        self.send(out + extra)

    def readline(self):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise _Closed()
            data = self.sock.recv(65536)
            if not data:
                raise _Closed()
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def read_exactly(self, size):
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise _Closed()
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def wait_for_close(self):
        """Hang: read and ignore until the client gives up (or stop() closes the socket)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise _Closed()

    def stage(self, name):
        if self.b["drop_after"] == name:
            raise _Closed()
        if self.b["hang"] == name:
            self.wait_for_close()

    # -- the dialogue

    def run(self):
        self.sock.settimeout(SOCKET_TIMEOUT)
        if self.b["hang"] is True:
            self.wait_for_close()
        self.stage("CONNECT")
        code, text = self.b["banner"]
        self.reply(code, text)
        if code == 421:
            return
        greeted = code == 220
        while True:
            line = self.readline()
            self.sink._command(self.index, line)
            if self.b["drop_after_messages"] is not None and \
                    self.messages_here >= self.b["drop_after_messages"]:
                raise _Closed()
            command, _, arg = line.rstrip(b"\r\n").partition(b" ")
            verb = command.upper().decode("ascii", "replace")
            arg = arg.decode("utf-8", "replace")
            if verb == "QUIT":
                self.stage("QUIT")
                self.reply(221, "2.0.0 Bye")
                return
            if not greeted:
                self.reply(503, "5.5.1 No service")
                continue
            handler = getattr(self, "do_" + verb, None)
            if handler is None:
                self.reply(500, "5.5.2 Command not recognized")
            else:
                handler(arg)

    def extensions(self):
        ext = ["8BITMIME"] if self.b["eightbitmime"] else []
        ext.append("ENHANCEDSTATUSCODES")
        ext += [name for name, key in (("SMTPUTF8", "smtputf8"), ("DSN", "dsn"),
                                       ("CHUNKING", "chunking")) if self.b[key]]
        if self.b["starttls"] and self.tls is None:
            ext.append("STARTTLS")
        if self.b["auth"] and (self.tls or not self.b["auth_needs_tls"]):
            ext.append("AUTH " + self.b["auth_mechanisms"])
        return ext

    def do_EHLO(self, arg):
        self.stage("EHLO")
        if self.b["ehlo_reply"]:
            self.reply(*self.b["ehlo_reply"])
            return
        self.helo = arg
        self.reset()
        self.reply(250, "\n".join(["sink.test Hello " + arg] + self.extensions()))

    def do_HELO(self, arg):
        self.stage("HELO")
        self.helo = arg
        self.reset()
        self.reply(250, "sink.test")

    def do_STARTTLS(self, arg):
        self.stage("STARTTLS")
        if not self.b["starttls"] or self.tls is not None:
            self.reply(502, "5.5.1 STARTTLS not available")
            return
        code, text = self.b["starttls_reply"]
        extra = self.b["inject_after_starttls"] or b""
        self.reply(code, text, extra)
        if code != 220:
            return
        self.stage("TLS")
        if self.b["starttls_garbage"]:
            self.send(b"this is not a TLS handshake\r\n" * 4)
            self.wait_for_close()
        self.buffer = b""  # anything the client pipelined before the handshake is dropped
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.b["cert"], self.b["key"])
        if self.b["client_ca"]:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(self.b["client_ca"])
        self.sock = context.wrap_socket(
            self.sock, server_side=True, do_handshake_on_connect=False)
        self.sink._socket(self.index, self.sock)  # the old object is detached now
        self.sock.do_handshake()
        self.tls = self.sock.version()
        peer = self.sock.getpeercert()
        if peer:
            for rdn in peer.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        self.client_cert = value
        # RFC 3207: forget everything said before TLS.
        self.helo = None
        self.auth = None
        self.reset()

    def do_AUTH(self, arg):
        self.stage("AUTH")
        words = arg.split()
        mechanism = words[0].upper() if words else ""
        offered = self.b["auth_mechanisms"].upper().split()
        if not self.b["auth"] or mechanism not in offered:
            self.reply(504, "5.5.4 Unrecognized authentication type")
            return
        try:
            if mechanism == "PLAIN":
                if len(words) > 1:
                    response = words[1]
                else:
                    self.reply(334, "")
                    response = self.readline().strip().decode("ascii")
                _, user, password = base64.b64decode(response).split(b"\0", 2)
            elif mechanism == "LOGIN":
                self.reply(334, base64.b64encode(b"Username:").decode())
                user = base64.b64decode(self.readline().strip())
                self.reply(334, base64.b64encode(b"Password:").decode())
                password = base64.b64decode(self.readline().strip())
            else:
                self.reply(504, "5.5.4 Unrecognized authentication type")
                return
        except (ValueError, TypeError):
            self.reply(501, "5.5.2 Cannot decode response")
            return
        user, password = user.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        self.sink._auth_attempt(self.index, user, password, self.tls)
        wanted = self.b["auth"]
        if wanted is True or tuple(wanted) == (user, password):
            self.auth = (user, password)
            self.reply(235, "2.7.0 Authentication successful")
        else:
            self.reply(535, "5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg):
        self.stage("MAIL")
        if not arg.upper().startswith("FROM:"):
            self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        code, text = self.b["mail_reply"]
        self.reply(code, text)
        if 200 <= code < 300:
            self.mail_from = _path(arg[5:])
            self.mail_params = _params(arg[5:])
            self.rcpt_to = []

    def do_RCPT(self, arg):
        self.stage("RCPT")
        if self.mail_from is None:
            self.reply(503, "5.5.1 Need MAIL first")
            return
        if not arg.upper().startswith("TO:"):
            self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        address = _path(arg[3:])
        code, text = (self.b["rcpt"] or {}).get(address, self.b["rcpt_default"])
        self.reply(code, text)
        if 200 <= code < 300:
            self.rcpt_to.append(address)
            self.rcpt_params[address] = _params(arg[3:])

    def do_DATA(self, arg):
        self.stage("DATA")
        if self.mail_from is None or not self.rcpt_to:
            self.reply(503, "5.5.1 Need RCPT first")
            return
        code, text = self.b["data_start_reply"]
        self.reply(code, text)
        if code != 354:
            return
        raw = []
        while True:
            line = self.readline()
            if line == b".\r\n":
                break
            raw.append(line)
        data = b"".join(raw)
        message = b"".join(line[1:] if line.startswith(b".") else line for line in raw)
        self.stage("DOT")
        self.finish_transaction(data, message, "DATA")

    def finish_transaction(self, data, message, via):
        code, text = self.b["data_reply"]
        record = dict(
            mail_from=self.mail_from, rcpt_to=list(self.rcpt_to), data=data, message=message,
            tls=self.tls, auth=self.auth, helo=self.helo, client_cert=self.client_cert,
            connection=self.index, reply=code, mail_params=self.mail_params,
            rcpt_params=dict(self.rcpt_params), via=via, chunks=list(self.chunks),
        )
        self.sink._transaction(record, accepted=200 <= code < 300)
        self.reply(code, text)
        self.reset()
        self.messages_here += 1
        if self.b["hangup_after_messages"] is not None and \
                self.messages_here >= self.b["hangup_after_messages"]:
            raise _Closed()

    def do_BDAT(self, arg):
        words = arg.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            self.reply(501, "5.5.4 Syntax: BDAT size [LAST]")
            return
        chunk = self.read_exactly(int(words[0]))
        if self.mail_from is None or not self.rcpt_to:
            self.reply(503, "5.5.1 Need RCPT first")
            return
        self.chunks.append(len(chunk))
        self.bdat_data.append(chunk)
        if len(words) == 1:
            self.reply(250, "2.0.0 %d octets received" % len(chunk))
            return
        self.stage("DOT")
        data = b"".join(self.bdat_data)
        self.finish_transaction(data, data, "BDAT")

    def do_RSET(self, arg):
        self.reset()
        self.reply(250, "2.0.0 Ok")

    def do_NOOP(self, arg):
        self.reply(250, "2.0.0 Ok")


def _params(text):
    """The ESMTP parameters after the path of MAIL or RCPT, as one string."""
    text = text.strip()
    if text.startswith("<") and ">" in text:
        return text[text.index(">") + 1:].strip()
    return text.partition(" ")[2].strip()


def _path(text):
    """The address inside <...> (parameters after it ignored); "" for <>."""
    text = text.strip()
    if text.startswith("<") and ">" in text:
        return text[1:text.index(">")]
    return text.split(" ", 1)[0]


class Sink:
    """See the module docstring."""

    def __init__(self, host="127.0.0.1", per_connection=None, port=0, **behaviour):
        """port 0: any free port; several sinks on different loopback hosts may share one."""
        self.wanted_port = port
        unknown = set(behaviour) - set(DEFAULTS)
        if unknown:
            raise TypeError("unknown Sink behaviour: %s" % ", ".join(sorted(unknown)))
        self.host = host
        self.base = dict(DEFAULTS, **behaviour)
        self.per_connection = list(per_connection or [])
        for overrides in self.per_connection:
            unknown = set(overrides) - set(DEFAULTS)
            if unknown:
                raise TypeError("unknown Sink behaviour: %s" % ", ".join(sorted(unknown)))
        self.messages = []
        self.transactions = []
        self.commands = []
        self.auth_attempts = []
        self.errors = []  # tracebacks of sessions that died of a bug in the sink
        self.connections = 0
        self.port = None
        self._lock = threading.Condition()
        self._open = {}  # connection index -> its current socket (plain or TLS)
        self._server = None
        self._thread = None

    def behaviour(self, index):
        if index < len(self.per_connection):
            return dict(self.base, **self.per_connection[index])
        return dict(self.base)

    def start(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server(self, (self.host, self.wanted_port), family)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs=dict(poll_interval=0.05),
            name="sink-%s-%d" % (self.host, self.port), daemon=True,
        )
        self._thread.start()
        return self.port

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            sockets = list(self._open.values())
        for sock in sockets:  # wake every session thread blocked in recv()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()  # joins the session threads
        self._thread.join()
        self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def wait_for_messages(self, count=1, timeout=10.0):
        """Block until at least count messages were accepted; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.messages) >= count, timeout)

    def commands_of(self, index):
        """The command lines (bytes, CRLF stripped) received on connection index."""
        return [line.rstrip(b"\r\n") for i, line in self.commands if i == index]

    # -- called from the server threads

    def _accepted(self, sock):
        with self._lock:
            index = self.connections
            self.connections += 1
            self._open[index] = sock
            return index

    def _socket(self, index, sock):
        with self._lock:
            self._open[index] = sock

    def _finished(self, index):
        with self._lock:
            self._open.pop(index, None)

    def _error(self, text):
        with self._lock:
            self.errors.append(text)

    def _command(self, index, line):
        with self._lock:
            self.commands.append((index, line))

    def _auth_attempt(self, index, user, password, tls):
        with self._lock:
            self.auth_attempts.append((index, user, password, tls))

    def _transaction(self, record, accepted):
        with self._lock:
            self.transactions.append(record)
            if accepted:
                self.messages.append(record)
            self._lock.notify_all()
