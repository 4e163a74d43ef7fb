"""
End to end, the real gateway in front of "Exchange": recipient validation and SMTP AUTH against
a real slapd (tests/slapdserver.py), certificate-based relay, BDAT in and out, SMTPUTF8 and DSN
parameters carried through to the next hop, and the header firewall.

One gateway serves the module: contoso.test is routed to an "Exchange" sink that offers
CHUNKING, SMTPUTF8 and DSN; everything else is held (harness.Holding).
"""

import base64
import os
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

from mailgate.smtp.auth import set_user
from tests.e2e import harness as h
from tests.slapdserver import shared_slapd
from tests.tlsutil import make_ca


class Env:
    pass


def config(e, ldap_uri):
    rel = lambda p: os.path.relpath(p, e.gw.directory)  # noqa: E731
    sections = {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "contoso.test, bücher.test"},
        "queue": {"path": "spool"},
        "tls": {"certificate": rel(e.cert), "private_key": rel(e.key),
                "client_ca_file": rel(e.partner_ca.ca_path)},
        "auth": {"backend": "ldap, file", "users_file": rel(e.users)},
        "ldap": {"uri": ldap_uri, "bind_dn": e.slapd.bind_dn,
                 "bind_password_file": rel(e.slapd.password_file(e.gw.directory)),
                 "base_dn": e.slapd.base_dn, "ca_file": rel(e.slapd.ca_path), "timeout": "2s"},
        "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                           "recipients": "ldap", "filters": ""},
        "listener:partner": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                             "auth": "none", "relay_client_certs": "partner.test",
                             "filters": ""},
        "listener:submission": {"endpoint": "tcp:{port}:interface=127.0.0.1",
                                "role": "submission", "filters": ""},
    }
    sections.update(e.holding.sections())
    sections["route:exchange"] = {"domains": "contoso.test, xn--bcher-kva.test",
                                  "smarthost": "127.0.0.1:%d" % e.exchange.port, "tls": "none"}
    return sections


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exchange"))
    e = Env()
    e.slapd = shared_slapd()
    e.ca = make_ca(os.path.join(root, "ca"))
    e.partner_ca = make_ca(os.path.join(root, "partner-ca"))
    e.cert, e.key = h.issue_server_cert(e.ca, os.path.join(root, "gw", "tls"))
    e.users = os.path.join(root, "gw", "users")
    set_user(e.users, "alice", "unused-file-password", senders=("@partner.test",))
    e.root = root
    e.gw = h.Gateway(os.path.join(root, "gw"))
    e.holding = h.Holding().start()
    e.exchange = h.sinks.Sink(chunking=True, smtputf8=True, dsn=True)
    e.exchange.start()
    try:
        e.gw.start(config(e, e.slapd.uri))
        e.tls = h.client_context(e.ca.ca_path)
        yield e
        e.gw.stop()
        assert e.gw.stopped_cleanly(), e.gw.describe()
        assert "Traceback" not in e.gw.all_output(), e.gw.describe()
    finally:
        try:
            e.gw.cleanup()
        finally:
            e.exchange.stop()
            e.holding.stop()


class Raw:
    """A raw SMTP client: bytes out, replies (code, [lines]) in."""

    def __init__(self, port, context=None):
        self.sock = socket.create_connection((h.LOOPBACK, port), timeout=15)
        self.buffer = b""
        self.context = context
        assert self.reply()[0] == 220

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode("utf-8"))

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("connection closed; got %r" % lines)
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def starttls(self, certfile=None, keyfile=None):
        assert self.cmd("STARTTLS")[0] == 220
        context = ssl.create_default_context(cafile=self.context)
        context.check_hostname = False
        if certfile:
            context.load_cert_chain(certfile, keyfile)
        self.sock = context.wrap_socket(self.sock, server_hostname=h.HOSTNAME)

    def close(self):
        try:
            self.cmd("QUIT")
        except (OSError, EOFError):
            pass
        self.sock.close()


@pytest.fixture
def raw(env):
    opened = []

    def connect(listener, **kw):
        client = Raw(env.gw.ports[listener], context=env.ca.ca_path, **kw)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def last_line(reply):
    return "%d %s" % (reply[0], reply[1][-1][4:])


# --- recipient validation ------------------------------------------------------------------------


def test_recipients_are_validated_against_the_directory(env, raw):
    c = raw("relay")
    c.cmd("EHLO client.test.example")
    assert c.cmd("MAIL FROM:<someone@internet.test>")[0] == 250
    assert last_line(c.cmd("RCPT TO:<alice@contoso.test>")) == "250 2.1.5 Ok"
    assert last_line(c.cmd("RCPT TO:<A.Smith@Contoso.test>")) == "250 2.1.5 Ok"
    assert last_line(c.cmd("RCPT TO:<made.up@contoso.test>")) == \
        "550 5.1.1 <made.up@contoso.test>: Recipient address rejected: User unknown"
    assert last_line(c.cmd("RCPT TO:<postmaster@contoso.test>")) == "250 2.1.5 Ok"
    assert last_line(c.cmd("RCPT TO:<x@elsewhere.test>")) == \
        "554 5.7.1 <x@elsewhere.test>: Relay access denied"


def test_directory_down_is_451(env, tmp_path):
    e = Env()
    e.__dict__.update(env.__dict__)
    e.gw = h.Gateway(str(tmp_path / "gw"))
    with socket.socket() as s:
        s.bind((h.LOOPBACK, 0))
        dead = "ldap://127.0.0.1:%d" % s.getsockname()[1]
    shutil.copy(env.users, str(tmp_path / "users"))
    e.users = str(tmp_path / "users")
    try:
        e.gw.start(config(e, dead), listeners=["relay"])
        c = Raw(e.gw.ports["relay"])
        c.cmd("EHLO client.test.example")
        c.cmd("MAIL FROM:<someone@internet.test>")
        reply = last_line(c.cmd("RCPT TO:<alice@contoso.test>"))
        assert reply.startswith("451 4.4.3 <alice@contoso.test>: Recipient address rejected"), reply
        c.close()
    finally:
        e.gw.cleanup()


# --- AUTH against the directory ------------------------------------------------------------------


def submit(env, user, password):
    client = h.smtp(env.gw.ports["submission"])
    client.starttls(context=env.tls)
    client.ehlo()
    return client, client.login(user, password)


def test_auth_by_upn_and_sam_account_name_and_senders(env):
    client, (code, _) = submit(env, "alice@corp.contoso.test", "alice-pw")
    assert code == 235
    assert client.mail("a.smith@contoso.test")[0] == 250  # a proxyAddresses alias
    client.rset()
    assert client.mail("anyone@partner.test")[0] == 250  # the users file's grant
    client.rset()
    code, text = client.mail("bob@contoso.test")
    assert (code, text[:22]) == (553, b"5.7.1 Sender address r")
    h.close(client)
    client, (code, _) = submit(env, "bob", "bob-pw")
    assert code == 235
    h.close(client)


def test_auth_wrong_password(env):
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        submit(env, "alice", "wrong")
    assert info.value.smtp_code == 535


# --- certificate-based relay ---------------------------------------------------------------------


def relay_with_certificate(env, raw, cert=None, key=None):
    """The reply to RCPT for another domain on the partner listener, after STARTTLS."""
    c = raw("partner")
    c.cmd("EHLO partner.test")
    c.starttls(cert, key)
    c.cmd("EHLO partner.test")
    c.cmd("MAIL FROM:<app@partner.test>")
    return last_line(c.cmd("RCPT TO:<x@elsewhere.test>"))


def test_a_partner_certificate_relays(env, raw):
    cert, key = env.partner_ca.issue("partner.test", os.path.join(env.root, "partner"))
    assert relay_with_certificate(env, raw, cert, key) == "250 2.1.5 Ok"


@pytest.mark.parametrize("who", ["nobody", "other name", "other CA"])
def test_no_or_the_wrong_certificate_does_not_relay(env, raw, who):
    cert = key = None
    if who == "other name":
        cert, key = env.partner_ca.issue("intruder.test", os.path.join(env.root, "intruder"))
    elif who == "other CA":
        cert, key = env.ca.issue("partner.test", os.path.join(env.root, "fake"))
    assert relay_with_certificate(env, raw, cert, key).startswith("554 5.7.1 ")


def test_only_the_partner_listener_asks_for_certificates(env):
    def request(listener):
        out = subprocess.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect",
             "127.0.0.1:%d" % env.gw.ports[listener]], input=b"", capture_output=True, timeout=30)
        return out.stdout.decode("utf-8", "replace")

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    assert "Acceptable client certificate CA names" in request("partner")
    assert "CN = mailgate test CA" in request("partner").split("Acceptable client")[1][:300]
    assert "No client certificate CA names sent" in request("relay")


# --- BDAT, SMTPUTF8, DSN, the header firewall: through to "Exchange" ------------------------------


def delivered(env, count):
    assert env.exchange.wait_for_messages(count, timeout=20), env.gw.describe()
    return env.exchange.messages[count - 1]


def test_bdat_in_and_out_with_a_fake_end_of_data_inside(env, raw):
    before = len(env.exchange.messages)
    body = (b"Subject: chunked\r\nX-MS-Exchange-Organization-SCL: -1\r\n\r\n"
            b"line\r\n.\r\nMAIL FROM:<evil@internet.test>\r\n")
    c = raw("relay")
    c.cmd("EHLO client.test.example")
    c.send(b"MAIL FROM:<someone@internet.test>\r\nRCPT TO:<bob@contoso.test>\r\n"
           b"BDAT 20\r\n" + body[:20] + b"BDAT %d LAST\r\n" % (len(body) - 20) + body[20:])
    assert c.reply()[0] == 250
    assert c.reply()[0] == 250
    assert last_line(c.reply()) == "250 2.0.0 Ok: 20 octets received"
    assert c.reply()[1][0].startswith("250 2.0.0 Ok: queued as ")
    message = delivered(env, before + 1)
    assert message["via"] == "BDAT"
    assert message["rcpt_to"] == ["bob@contoso.test"]
    assert message["message"].endswith(b"line\r\n.\r\nMAIL FROM:<evil@internet.test>\r\n")
    assert b"X-MS-Exchange-Organization-SCL" not in message["message"]  # the header firewall


def test_smtputf8_and_dsn_carried_through(env, raw):
    before = len(env.exchange.messages)
    c = raw("relay")
    assert "250-SMTPUTF8" in c.cmd("EHLO client.test.example")[1]
    assert c.cmd("MAIL FROM:<rené@internet.test> SMTPUTF8 RET=HDRS ENVID=E+2B1")[0] == 250
    assert last_line(c.cmd("RCPT TO:<jörg@contoso.test> NOTIFY=SUCCESS,FAILURE "
                           "ORCPT=rfc822;joerg@contoso.test")) == "250 2.1.5 Ok"
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: grüße\r\nFrom: René <rené@internet.test>\r\n\r\nHallo Jörg\r\n.\r\n")
    assert c.reply()[0] == 250
    message = delivered(env, before + 1)
    assert message["mail_from"] == "rené@internet.test"
    assert message["rcpt_to"] == ["jörg@contoso.test"]
    assert message["mail_params"] == "BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=E+2B1"
    assert message["rcpt_params"] == {
        "jörg@contoso.test": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;joerg@contoso.test"}
    assert "Hallo Jörg".encode() in message["message"]
    assert b"with UTF8SMTP id" in message["message"]


def test_an_idn_accepted_domain(env, raw):
    c = raw("relay")
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@internet.test> SMTPUTF8")
    # bücher.test is accepted (its A-label is routed), but nobody there is in the directory.
    assert last_line(c.cmd("RCPT TO:<x@bücher.test>")).startswith("550 5.1.1 ")
    assert last_line(c.cmd("RCPT TO:<x@xn--bcher-kva.test>")).startswith("550 5.1.1 ")
    assert last_line(c.cmd("RCPT TO:<x@bücher.example>")).startswith("554 5.7.1 ")
