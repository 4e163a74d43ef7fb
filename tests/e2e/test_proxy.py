"""
End to end: the real gateway on a `haproxy:tcp` listener, reached by a test client that sends raw
PROXY v1 and v2 headers as a load balancer would.  The proxied address is what allowed_ips,
relay_ips, the protocol log, the Received header and SPF see; a peer outside proxy_from is
refused before anything is read.
"""

import json
import os
import smtplib
import socket
import struct

import pytest

from tests.e2e import harness as h

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT = "203.0.113.7"  # what the balancer says the client is
RELAY_CLIENT = "203.0.113.8"  # in relay_ips
SPF_DOMAIN = "proxied-spf.test"


def v1(source, destination="192.0.2.25"):
    return ("PROXY TCP4 %s %s 40001 25\r\n" % (source, destination)).encode()


def v2(source, destination="192.0.2.25"):
    body = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", 40001, 25)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def proxied(port, header, source=h.LOOPBACK):
    """An smtplib session whose connection started with header (banner read into .banner)."""
    sock = socket.create_connection((h.LOOPBACK, port), timeout=15, source_address=(source, 0))
    sock.sendall(header)
    client = smtplib.SMTP(local_hostname=h.CLIENT_HELO, timeout=15)
    client._host = h.LOOPBACK
    client.sock = sock
    client.banner = client.getreply()
    return client


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("proxy"))
    holding = h.Holding().start()
    holding.dns.add(SPF_DOMAIN, "TXT", "v=spf1 ip4:%s -all" % CLIENT)
    gw = h.Gateway(os.path.join(root, "gw"))
    config = {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com"},
        "queue": {"path": "spool"},
        "logging": {"dir": "logs"},
        "listener:edge": {"endpoint": "haproxy:tcp:{port}:interface=127.0.0.1", "role": "relay",
                          "tls": "none", "auth": "none", "proxy_from": "127.0.0.1",
                          "allowed_ips": "203.0.113.0/24", "relay_ips": RELAY_CLIENT, "filters": "spf"},
    }
    config.update(holding.sections())
    try:
        gw.start(config)
        yield gw
        gw.stop()
        assert gw.stopped_cleanly(), gw.describe()
        assert "Traceback" not in gw.all_output(), gw.describe()
    finally:
        try:
            gw.cleanup()
        finally:
            holding.stop()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_proxied_client_is_the_client(env, header):
    client = proxied(env.ports["edge"], header(CLIENT))
    try:
        assert client.banner[0] == 220, client.banner
        client.ehlo()
        client.mail("someone@" + SPF_DOMAIN)
        assert client.rcpt("far@elsewhere.example")[0] == 554  # not in relay_ips: no relaying
        client.rset()
        queue_id = h.transaction(client, "someone@" + SPF_DOMAIN, ["user@example.com"],
                                 h.make_message("proxied " + header.__name__))
    finally:
        h.close(client)
    entry = h.spool_entry(env.path("spool"), queue_id)
    assert entry.envelope["client_ip"] == CLIENT
    received = entry.body.split(b"\r\n", 1)[0]
    assert received == ("Received: from %s ([%s])" % (h.CLIENT_HELO, CLIENT)).encode()
    assert ("spf=pass smtp.mailfrom=" + SPF_DOMAIN).encode() in entry.body  # judged on CLIENT

    def logged():
        with open(env.path("logs", "protocol.log")) as f:
            events = [json.loads(line) for line in f]
        return [e for e in events if e.get("event") == "connect" and e["remote"] == CLIENT + ":40001"]

    h.wait_until(logged, 10, "the protocol log's connect event with the proxied address")


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_relay_ips_judge_the_proxied_address(env, header):
    client = proxied(env.ports["edge"], header(RELAY_CLIENT))
    try:
        h.transaction(client, "someone@sender.example", ["far@elsewhere.example"],
                      h.make_message("relayed " + header.__name__))
    finally:
        h.close(client)


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_allowed_ips_judge_the_proxied_address(env, header):
    client = proxied(env.ports["edge"], header("198.51.100.9"))
    try:
        assert client.banner == (554, b"5.7.1 %s Access denied" % h.HOSTNAME.encode())
    finally:
        client.close()
    env.wait_for_line(r"refused 198\.51\.100\.9 on edge: not in allowed_ips")


def test_header_from_outside_proxy_from_is_refused(env):
    sock = socket.create_connection((h.LOOPBACK, env.ports["edge"]), timeout=15,
                                    source_address=("127.0.0.2", 0))
    try:
        sock.sendall(v1(CLIENT))
        assert sock.recv(100) == b""  # closed, nothing said
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    env.wait_for_line(r"refused 127\.0\.0\.2:\d+ on listener edge: not in proxy_from")


def test_smtp_without_a_header_is_dropped(env):
    sock = socket.create_connection((h.LOOPBACK, env.ports["edge"]), timeout=15)
    try:
        sock.sendall(b"EHLO client.test.example\r\n")
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    env.wait_for_line(r"bad PROXY header from 127\.0\.0\.1:\d+ on listener edge")
