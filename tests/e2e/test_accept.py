"""
End to end: the real gateway (twistd) accepting mail on its three kinds of listener, every SMTP
reply of the contract, and what lands in the spool for each accepted message.

One gateway serves the whole module; every test uses its own sessions.  Its outbound mail is held
(harness.Holding: every recipient answered 451 by a loopback sink), so accepted messages stay
queued, in active/ or, after the first attempt, deferred/.
"""

import base64
import os
import re
import smtplib
import socket
import ssl
import warnings

import pytest

from mailgate.smtp.auth import set_user
from tests.e2e import harness as h
from tests.tlsutil import make_ca

ALICE = ("alice@example.com", "alice-secret-1")  # no senders listed: may send as herself
BOB = ("bob", "bob-secret-2")  # a plain username granted bob@example.com and @example.org

EHLO_BASE = ["PIPELINING", "SIZE 1048576", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING",
             "SMTPUTF8", "DSN"]


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("accept"))
    e = Env()
    e.ca = make_ca(os.path.join(root, "ca"))
    cert, key = h.issue_server_cert(e.ca, os.path.join(root, "gw", "tls"))
    users = os.path.join(root, "gw", "users")
    set_user(users, ALICE[0], ALICE[1])
    set_user(users, BOB[0], BOB[1], senders=("bob@example.com", "@example.org"))
    e.gw = h.Gateway(os.path.join(root, "gw"))
    e.holding = h.Holding().start()
    try:
        e.gw.start(h.base_config(e.gw.directory, cert, key, users, e.holding))
        e.spool = e.gw.path("spool")
        e.tls = h.client_context(e.ca.ca_path)
        yield e
        e.gw.stop()
        assert e.gw.stopped_cleanly(), e.gw.describe()
        assert "Traceback" not in e.gw.all_output(), e.gw.describe()
        assert e.holding.sink.messages == []  # held: nothing was delivered
    finally:
        try:
            e.gw.cleanup()
        finally:
            e.holding.stop()


@pytest.fixture
def clients():
    """Sessions opened by a test, closed whatever happens."""
    opened = []
    yield opened
    for client in opened:
        h.close(client)


def connect(env, clients, listener, source=None):
    client = h.smtp(env.gw.ports[listener], source=source)
    clients.append(client)
    return client


def connect_tls(env, clients, listener):
    client = h.smtps(env.gw.ports[listener], env.tls)
    clients.append(client)
    return client


def ehlo_lines(client):
    code, text = client.ehlo()
    assert code == 250, (code, text)
    return text.decode().split("\n")


def reply(client, *command):
    """docmd, returning (code, 'status text') as str for exact comparisons."""
    code, text = client.docmd(*command)
    return code, text.decode("utf-8", "replace")


def b64(text):
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def check_entry(env, queue_id, message, **expected):
    """The spool file of an accepted message (queued: in active/ or deferred/): complete, crc ok,
    envelope fields, Received first."""
    assert queue_id in h.queued_ids(env.spool), h.spool_listing(env.spool)
    entry = h.spool_entry(env.spool, queue_id)
    envelope = entry.envelope
    assert h.ENVELOPE_FIELDS <= set(envelope), sorted(envelope)
    for field, value in expected.items():
        assert envelope[field] == value, (field, envelope[field], value)
    assert envelope["client_ip"] == "127.0.0.1" or "client_ip" in expected
    assert envelope["size"] == len(entry.body)
    # The Received header is prepended, the client's message follows byte for byte.
    assert entry.body.endswith(message), entry.body[:400]
    received = entry.body[: len(entry.body) - len(message)].decode("utf-8")
    helo, ip, protocol = envelope["helo"], envelope["client_ip"], envelope["protocol"]
    assert received.startswith("Received: from %s ([%s])" % (helo, ip)), received
    assert "by %s (mailgate) with %s id %s" % (h.HOSTNAME, protocol, queue_id) in received, received
    if envelope["tls_version"]:
        assert "(using %s with cipher %s)" % (envelope["tls_version"], envelope["tls_cipher"]) in received
    else:
        assert "(using" not in received
    parsed = entry.message()
    assert parsed.keys()[0] == "Received", parsed.keys()
    assert len(parsed.get_all("Received")) == 1
    return entry


# --- relay listener --------------------------------------------------------------------------------


def test_relay_plain_banner_ehlo_and_accept(env, clients):
    client = connect(env, clients, "relay")
    assert client.banner == (220, ("%s ESMTP" % h.HOSTNAME).encode())
    assert ehlo_lines(client) == [h.HOSTNAME] + EHLO_BASE + ["STARTTLS"]  # no AUTH without TLS
    message = h.make_message("relay plain")
    queue_id = h.transaction(client, "sender@example.org", ["user@example.com"], message)
    entry = check_entry(env, queue_id, message, sender="sender@example.org",
                        recipients=["user@example.com"], client_ip="127.0.0.1", helo=h.CLIENT_HELO,
                        listener="relay", user=None, tls_version=None, tls_cipher=None,
                        protocol="ESMTP")
    assert entry.message()["Subject"] == "relay plain"
    assert "for <user@example.com>;" in entry.body.split(b"\r\n\r\n")[0].decode()


def test_relay_several_messages_in_one_session(env, clients):
    client = connect(env, clients, "relay")
    ids = []
    for n in range(3):
        message = h.make_message("relay session %d" % n)
        ids.append(h.transaction(client, "", ["a@example.com", "b@example.com"], message))
        check_entry(env, ids[-1], message, sender="", recipients=["a@example.com", "b@example.com"],
                    listener="relay", protocol="ESMTP")
    assert len(set(ids)) == 3
    assert ids == sorted(ids)  # time-ordered ids


def test_relay_recipient_policy(env, clients):
    client = connect(env, clients, "relay")
    client.ehlo()
    assert reply(client, "MAIL", "FROM:<someone@elsewhere.test>") == (250, "2.1.0 Ok")
    assert reply(client, "RCPT", "TO:<user@example.com>") == (250, "2.1.5 Ok")
    code, text = reply(client, "RCPT", "TO:<user@elsewhere.test>")
    assert (code, text[:5]) == (554, "5.7.1"), (code, text)
    assert "Relay access denied" in text
    code, text = reply(client, "RCPT", "TO:<user@sub.example.com>")  # no subdomains
    assert (code, text[:5]) == (554, "5.7.1"), (code, text)
    code, text = reply(client, "RCPT", 'TO:<"user%elsewhere.test"@example.com>')  # routing trick
    assert (code, text[:5]) == (554, "5.7.1"), (code, text)
    assert reply(client, "RSET") == (250, "2.0.0 Ok")


def test_relay_ips_may_relay_anywhere(env, clients):
    client = connect(env, clients, "relay", source="127.0.0.2")
    message = h.make_message("from a relay ip", to="user@elsewhere.test")
    queue_id = h.transaction(client, "app@example.com", ["user@elsewhere.test"], message)
    check_entry(env, queue_id, message, client_ip="127.0.0.2", recipients=["user@elsewhere.test"],
                user=None, protocol="ESMTP", listener="relay")


def test_relay_auth_needs_tls(env, clients):
    client = connect(env, clients, "relay")
    client.ehlo()
    code, text = reply(client, "AUTH", "PLAIN " + b64("\0%s\0%s" % ALICE))
    assert (code, text[:6]) == (538, "5.7.11"), (code, text)


def test_relay_starttls_and_accept(env, clients):
    client = connect(env, clients, "relay")
    client.ehlo()
    code, text = client.starttls(context=env.tls)
    assert (code, text) == (220, b"2.0.0 Ready to start TLS")
    version, cipher = client.sock.version(), client.sock.cipher()[0]
    assert version == "TLSv1.3"
    assert ehlo_lines(client) == [h.HOSTNAME] + EHLO_BASE + ["AUTH PLAIN LOGIN"]  # no STARTTLS twice
    message = h.make_message("relay starttls")
    queue_id = h.transaction(client, "sender@example.org", ["user@example.com"], message)
    check_entry(env, queue_id, message, sender="sender@example.org", recipients=["user@example.com"],
                helo=h.CLIENT_HELO, listener="relay", user=None, tls_version="TLSv1.3",
                tls_cipher=cipher, protocol="ESMTPS")
    assert version == "TLSv1.3"


def test_size_limit(env, clients):
    client = connect(env, clients, "relay")
    client.ehlo()
    assert client.has_extn("size") and int(client.esmtp_features["size"]) == 1024 * 1024
    code, text = reply(client, "MAIL", "FROM:<a@example.org> SIZE=%d" % (1024 * 1024 + 1))
    assert (code, text) == (552, "5.3.4 Message size exceeds fixed limit")
    assert reply(client, "MAIL", "FROM:<a@example.org> SIZE=%d" % (1024 * 1024)) == (250, "2.1.0 Ok")
    assert client.rcpt("user@example.com")[0] == 250
    before = h.queued_ids(env.spool)
    # > 1M without the headers.  (Short lines: 998-octet ones cost the server ~4 s of CPU per MB,
    # see mailgate/datascan.py _LONG_LINE.)
    big = h.make_message("too big", body=("x" * 76 + "\r\n") * 14000)
    code, text = client.data(big)
    assert (code, text) == (552, b"5.3.4 Message size exceeds fixed limit")
    assert h.queued_ids(env.spool) == before
    # The session goes on.
    message = h.make_message("after too big")
    queue_id = h.transaction(client, "a@example.org", ["user@example.com"], message)
    check_entry(env, queue_id, message)


def test_max_recipients(env, clients):
    client = connect(env, clients, "relay")
    client.ehlo()
    client.mail("a@example.org")
    for n in range(100):
        assert reply(client, "RCPT", "TO:<u%d@example.com>" % n) == (250, "2.1.5 Ok")
    assert reply(client, "RCPT", "TO:<u100@example.com>") == (452, "4.5.3 Too many recipients")
    assert reply(client, "RCPT", "TO:<u101@example.com>") == (452, "4.5.3 Too many recipients")
    message = h.make_message("hundred recipients")
    code, text = client.data(message)
    queue_id = h.queue_id_of(code, text)
    entry = check_entry(env, queue_id, message)
    assert entry.envelope["recipients"] == ["u%d@example.com" % n for n in range(100)]


# --- submission listener (STARTTLS) ----------------------------------------------------------------


def test_submission_requires_starttls(env, clients):
    client = connect(env, clients, "submission")
    assert client.banner == (220, ("%s ESMTP" % h.HOSTNAME).encode())
    assert ehlo_lines(client) == [h.HOSTNAME] + EHLO_BASE + ["STARTTLS"]
    must = (530, "5.7.0 Must issue a STARTTLS command first")
    assert reply(client, "MAIL", "FROM:<%s>" % ALICE[0]) == must
    assert reply(client, "RCPT", "TO:<user@example.com>") == must
    assert reply(client, "DATA") == must
    assert reply(client, "AUTH", "PLAIN " + b64("\0%s\0%s" % ALICE)) == must


def test_submission_requires_auth(env, clients):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    assert ehlo_lines(client) == [h.HOSTNAME] + EHLO_BASE + ["AUTH PLAIN LOGIN"]
    assert reply(client, "MAIL", "FROM:<%s>" % ALICE[0]) == (530, "5.7.0 Authentication required")


def _submit_and_check(env, client, user, sender, listener, recipients=("user@example.com",)):
    message = h.make_message("submitted by %s via %s" % (user, listener), sender=sender)
    queue_id = h.transaction(client, sender, list(recipients), message)
    return check_entry(env, queue_id, message, sender=sender, recipients=list(recipients),
                       helo=h.CLIENT_HELO, listener=listener, user=user, tls_version="TLSv1.3",
                       tls_cipher=client.sock.cipher()[0], protocol="ESMTPSA")


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial-response", "challenge"])
def test_submission_auth_plain(env, clients, initial_response):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    client.ehlo()
    client.user, client.password = ALICE
    code, text = client.auth("PLAIN", client.auth_plain, initial_response_ok=initial_response)
    assert (code, text) == (235, b"2.7.0 Authentication successful")
    # Authenticated: may send to any domain.
    _submit_and_check(env, client, ALICE[0], ALICE[0], "submission",
                      recipients=("user@example.com", "friend@elsewhere.test"))


def test_submission_login_helper(env, clients):
    """smtplib's own login() (it picks PLAIN, with an initial response)."""
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    assert client.login(*ALICE) == (235, b"2.7.0 Authentication successful")
    _submit_and_check(env, client, ALICE[0], ALICE[0], "submission")


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial-response", "challenge"])
def test_submission_auth_login(env, clients, initial_response):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    client.ehlo()
    client.user, client.password = BOB
    code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response)
    assert (code, text) == (235, b"2.7.0 Authentication successful")
    _submit_and_check(env, client, BOB[0], "bob@example.com", "submission")


def test_submission_sender_must_be_granted(env, clients):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    client.login(*BOB)
    code, text = reply(client, "MAIL", "FROM:<alice@example.com>")
    assert (code, text[:5]) == (553, "5.7.1"), (code, text)
    code, text = reply(client, "MAIL", "FROM:<bob@elsewhere.test>")
    assert (code, text[:5]) == (553, "5.7.1"), (code, text)
    # A granted @domain works for any local part there.
    _submit_and_check(env, client, BOB[0], "anyone@example.org", "submission")

    other = connect(env, clients, "submission")
    other.starttls(context=env.tls)
    other.login(*ALICE)
    code, text = reply(other, "MAIL", "FROM:<bob@example.com>")
    assert (code, text[:5]) == (553, "5.7.1"), (code, text)


def test_auth_failures(env, clients):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    client.ehlo()
    bad = (535, "5.7.8 Authentication credentials invalid")
    assert reply(client, "AUTH", "PLAIN " + b64("\0%s\0wrong" % ALICE[0])) == bad
    assert reply(client, "AUTH", "PLAIN " + b64("\0nobody@example.com\0whatever")) == bad
    # The third failure is answered, then the session ends with 421.
    assert reply(client, "AUTH", "LOGIN " + b64(BOB[0])) == (334, "UGFzc3dvcmQ6")
    assert reply(client, b64("not-bobs-password")) == bad
    code, text = client.getreply()
    assert code == 421 and text.startswith(b"4.7.0 "), (code, text)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.getreply()


def test_auth_success_after_a_failure(env, clients):
    client = connect(env, clients, "submission")
    client.starttls(context=env.tls)
    client.ehlo()
    assert reply(client, "AUTH", "PLAIN " + b64("\0%s\0nope" % ALICE[0]))[0] == 535
    assert reply(client, "AUTH", "PLAIN " + b64("\0%s\0%s" % ALICE)) == (235, "2.7.0 Authentication successful")


# --- implicit TLS ------------------------------------------------------------------------------------


def test_implicit_tls(env, clients):
    client = connect_tls(env, clients, "smtps")
    assert client.banner == (220, ("%s ESMTP" % h.HOSTNAME).encode())
    assert client.sock.version() == "TLSv1.3"
    assert ehlo_lines(client) == [h.HOSTNAME] + EHLO_BASE + ["AUTH PLAIN LOGIN"]  # no STARTTLS
    assert reply(client, "MAIL", "FROM:<%s>" % ALICE[0]) == (530, "5.7.0 Authentication required")
    client.login(*ALICE)
    _submit_and_check(env, client, ALICE[0], ALICE[0], "smtps")


def test_certificate_names_the_hostname(env):
    """The server certificate verifies for mx.test.example as well as for 127.0.0.1."""
    with socket.create_connection((h.LOOPBACK, env.gw.ports["smtps"]), timeout=10) as raw:
        with env.tls.wrap_socket(raw, server_hostname=h.HOSTNAME) as tls:
            assert tls.recv(100).startswith(b"220 mx.test.example ESMTP")
    wrong = h.client_context(env.ca.ca_path)
    with socket.create_connection((h.LOOPBACK, env.gw.ports["smtps"]), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            wrong.wrap_socket(raw, server_hostname="other.test.example")


# --- TLS versions and ciphers --------------------------------------------------------------------------


def test_tls11_client_is_refused(env, clients):
    # A client willing to do TLS 1.0/1.1 (security level 0 so that its own OpenSSL offers them):
    # the server must refuse the handshake.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    ctx = h.client_context(env.ca.ca_path, minimum=old[0], maximum=old[1],
                           ciphers="DEFAULT:@SECLEVEL=0")
    client = connect(env, clients, "relay")
    client.ehlo()
    with pytest.raises(ssl.SSLError) as failed:
        client.starttls(context=ctx)
    # The server said no (a protocol_version alert), not our own OpenSSL.
    assert "PROTOCOL_VERSION" in str(failed.value).upper(), failed.value
    with socket.create_connection((h.LOOPBACK, env.gw.ports["smtps"]), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as failed:
            ctx.wrap_socket(raw, server_hostname=h.LOOPBACK)
    assert "PROTOCOL_VERSION" in str(failed.value).upper(), failed.value
    # The gateway is unharmed.
    assert connect(env, clients, "relay").noop()[0] == 250


def test_tls12_negotiates_ecdhe_aead(env, clients):
    ctx = h.client_context(env.ca.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
    client = connect(env, clients, "relay")
    client.ehlo()
    client.starttls(context=ctx)
    name, version, _bits = client.sock.cipher()
    assert version == "TLSv1.2" and client.sock.version() == "TLSv1.2"
    assert re.fullmatch(r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", name), name
    message = h.make_message("tls 1.2")
    queue_id = h.transaction(client, "a@example.org", ["user@example.com"], message)
    check_entry(env, queue_id, message, tls_version="TLSv1.2", tls_cipher=name, protocol="ESMTPS")


def test_tls12_cbc_only_client_is_refused(env, clients):
    ctx = h.client_context(env.ca.ca_path, maximum=ssl.TLSVersion.TLSv1_2,
                           ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:AES128-SHA:@SECLEVEL=0")
    client = connect(env, clients, "relay")
    client.ehlo()
    with pytest.raises(ssl.SSLError) as failed:
        client.starttls(context=ctx)
    assert "ALERT" in str(failed.value).upper(), failed.value  # refused by the server


def test_spool_has_no_partial_files(env):
    """After all of the above: every entry readable, nothing left in tmp/, nothing corrupt."""
    # Delivery writes state files through tmp/: wait until it has tried every message once (all
    # in deferred/, the next attempt an hour away) and nothing writes to the spool any more.
    h.wait_until(lambda: not h.spool_listing(env.spool)["active"], 30,
                 lambda: "active/ to drain into deferred/: %s" % h.spool_listing(env.spool))
    listing = h.spool_listing(env.spool)
    assert listing["tmp"] == [] and listing["corrupt"] == []
    assert listing["active"] or listing["deferred"]
    for state in h.QUEUED_DIRS:
        for name in listing[state]:
            try:
                h.spool_entry(env.spool, name, state)
            except FileNotFoundError:  # moved to deferred/ since the listing: read it there
                h.spool_entry(env.spool, name)
    # Held, never bounced: no DSN was queued (they come from <> and are for the senders).
    for name in h.queued_ids(env.spool):
        assert h.spool_entry(env.spool, name).envelope["protocol"] != "local", name
