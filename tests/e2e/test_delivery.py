"""
End to end: the real gateway (twistd) DELIVERING what it accepts, to SMTP sinks on loopback, with
every name looked up in a loopback test DNS server.

Each test builds a Lab: a TestDNS (thread), the sinks it needs, and one gateway process whose
configuration names that DNS server in [dns] nameservers, listens on a relay listener that lets
127.0.0.1 relay anywhere (no TLS, no AUTH: what is tested is the outbound side), and has a route
for the senders' domain (sender.example) to a sink of its own, so that every DSN is caught there.
MX hosts are sinks on 127.0.0.2, 127.0.0.3, ... sharing one port, [delivery] mx_port.

Nothing waits with a fixed sleep: sinks are waited on with sink.wait_for_messages(n, timeout) and
the spool is polled with short waits until a deadline (harness.wait_until).  Retry schedules and
timeouts are short (retry = 1s, max_lifetime = 3s for expiry) so that the module runs in seconds.
"""

import collections
import email
import email.policy
import os
import re
import secrets
import threading
import time

import dkim
import dns.exception
import dns.resolver
import pytest

from tests.e2e import harness as h
from tests.sinks import Sink
from tests.tlsutil import make_ca

SENDER_DOMAIN = "sender.example"
SENDER = "sender@" + SENDER_DOMAIN
WAIT = 15.0  # the longest any single wait may take before the test fails


# --- the lab -------------------------------------------------------------------------------------


class Lab(h.Lab):
    """The delivery tests' lab: a sink for the DSNs to SENDER, MX sinks on one port."""

    def prepare(self):
        self.dsn = self.sink()  # [route:senders]: where every DSN for SENDER goes

    # -- sinks

    def mx_sinks(self, behaviours):
        """
        {address: behaviour} -> (port, {address: sink}): one sink per loopback address, all on the
        same port (the gateway reaches every MX host on [delivery] mx_port).
        """
        hosts = list(behaviours)
        for _ in range(10):
            port = h.common_free_port(hosts)
            started = {}
            try:
                for host in hosts:
                    sink = h.PortSink(host, port, **behaviours[host])
                    sink.start()
                    started[host] = sink
            except OSError:  # taken meanwhile: all again on another port
                for sink in started.values():
                    sink.stop()
                continue
            self.sinks += started.values()
            return port, started
        raise RuntimeError("no common free port on %s" % hosts)

    # -- the gateway

    def config(self, routes, delivery=None, mx_port=None, **sections):
        delivery_section = {
            "retry": "1s", "max_lifetime": "1h", "delay_warning": "0", "connect_timeout": "2s",
            "command_timeout": "5s", "data_timeout": "5s",
        }
        if mx_port is not None:
            delivery_section["mx_port"] = mx_port
        delivery_section.update(delivery or {})
        config = {
            "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com",
                        "max_message_size": "1M"},
            "queue": {"path": "spool"},
            "dns": {"nameservers": "%s:%d" % self.dns.address, "timeout": "2s"},
            "delivery": delivery_section,
            "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                               "tls": "none", "auth": "none", "relay_ips": "127.0.0.1/32"},
            "route:senders": {"domains": SENDER_DOMAIN, "tls": "none",
                              "smarthost": "127.0.0.1:%d" % self.dsn.port},
        }
        for name, route in routes.items():
            config["route:" + name] = route
        config.update(sections)
        return config

    def start(self, routes, delivery=None, mx_port=None, **sections):
        self.gw.start(self.config(routes, delivery, mx_port, **sections))
        return self.gw

    def finish(self):
        """Stop the gateway cleanly and check that nothing went wrong on either side."""
        self.gw.stop()
        assert self.gw.stopped_cleanly(), self.gw.describe()
        assert "Traceback" not in self.gw.all_output(), self.gw.describe()
        for sink in self.sinks:
            assert not sink.errors, sink.errors

    # -- mail

    def send(self, recipients, message, sender=SENDER):
        """One message through the relay listener; its queue id."""
        client = h.smtp(self.gw.ports["relay"])
        try:
            return h.transaction(client, sender, list(recipients), message)
        finally:
            h.close(client)

    # -- waiting

    def wait_gone(self, queue_id, timeout=WAIT):
        """Until queue_id has left the spool (every recipient has an outcome)."""
        h.wait_until(lambda: queue_id not in h.queued_ids(self.spool), timeout,
                     lambda: "%s to leave the spool: %s\n%s"
                     % (queue_id, h.spool_listing(self.spool), self.gw.describe()))

    def wait_deferred(self, queue_id, timeout=WAIT):
        """Until queue_id is in deferred/ with its delivery state saved; that state (a dict)."""
        def deferred():
            if h.queued_state(self.spool, queue_id) != "deferred":
                return None
            return h.read_state(self.spool, queue_id)

        return h.wait_until(deferred, timeout, lambda: "%s in deferred/ with a state file: %s\n%s"
                            % (queue_id, h.spool_listing(self.spool), self.gw.describe()))

    def wait_dsns(self, count, timeout=WAIT):
        assert self.dsn.wait_for_messages(count, timeout), (
            "%d DSN(s) expected, %d received\n%s" % (count, len(self.dsn.messages), self.gw.describe()))
        return [parse_dsn(record) for record in self.dsn.messages]


@pytest.fixture
def lab(tmp_path):
    lab = Lab(str(tmp_path))
    try:
        yield lab
    finally:
        lab.close()


# --- helpers ---------------------------------------------------------------------------------------


def message(subject, to, sender=SENDER, body="Hello.\r\n", extra_headers=()):
    return h.make_message(subject, sender=sender, to=to, body=body, extra_headers=extra_headers)


def unique(what):
    return "%s %s" % (what, secrets.token_hex(4))


def commands(sink, verb):
    """Every command line starting with verb (bytes, e.g. b"MAIL") the sink received."""
    return [line for _, line in sink.commands if line.upper().startswith(verb)]


def header_block(data):
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_fields(block):
    """The header fields of a header block (bytes, CRLF lines), each with its folded lines."""
    out = []
    for line in block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\r\n" + line
        else:
            out.append(line)
    return [field + b"\r\n" for field in out]


# Trace fields the gateway itself may put under its Received line: the inbound filter chain's
# Authentication-Results (authserv-id = our hostname) on listeners with filters.
OWN_TRACE = re.compile(rb"\AAuthentication-Results: %s;" % re.escape(h.HOSTNAME.encode()))


def check_received_then(delivered, sent, queue_id, recipient):
    """
    delivered is our Received field first, then (only) trace fields of our own, then what the
    client sent byte for byte: the header block after them is the one sent, and so is the body.
    """
    assert delivered.endswith(sent), delivered[:600]
    ours = header_fields(delivered[: len(delivered) - len(sent)])
    assert ours and b"".join(ours) == delivered[: len(delivered) - len(sent)], delivered[:600]
    received = ours[0]
    assert received.startswith(b"Received: from %s ([127.0.0.1])" % h.CLIENT_HELO.encode()), received
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", received).decode("ascii")
    assert "by %s (mailgate) with ESMTP id %s" % (h.HOSTNAME, queue_id) in unfolded, unfolded
    assert "for <%s>;" % recipient in unfolded, unfolded
    added = ours[1:]
    assert all(OWN_TRACE.match(field) for field in added), "not ours: %r" % added
    assert header_block(delivered) == b"".join(ours) + header_block(sent)
    parsed = email.message_from_bytes(delivered, policy=email.policy.compat32)
    original = email.message_from_bytes(sent, policy=email.policy.compat32)
    assert parsed.keys() == ["Received"] + ["Authentication-Results"] * len(added) + original.keys()
    assert parsed.items()[1 + len(added):] == original.items()
    assert len(parsed.get_all("Received")) == 1


Dsn = collections.namedtuple("Dsn", "message text per_message recipients headers record")


def parse_dsn(record):
    """An RFC 3464 DSN received by a sink, parsed with the email package, its structure checked."""
    assert record["mail_from"] == "", record["mail_from"]  # from the null reverse-path
    assert record["rcpt_to"] == [SENDER], record["rcpt_to"]
    msg = email.message_from_bytes(record["message"], policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@" + h.HOSTNAME, msg["From"]
    assert msg["To"].addresses[0].addr_spec == SENDER, msg["To"]
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"], parts
    blocks = parts[1].get_payload()  # the per-message fields, then one block per recipient
    assert len(blocks) >= 2, blocks
    assert blocks[0]["Reporting-MTA"] == "dns; " + h.HOSTNAME
    return Dsn(msg, parts[0].get_content(), blocks[0], blocks[1:], parts[2].get_content(), record)


def fields(block):
    return {key: str(value) for key, value in block.items()}


def log_line(gw, pattern):
    """The first stdout line of the gateway matching the regex pattern, or None."""
    regex = re.compile(pattern)
    return next((line for line in gw.stdout_lines if regex.search(line)), None)


# --- 1. smarthosts --------------------------------------------------------------------------------


def test_smarthost_failover_keeps_the_message_intact(lab):
    closed = h.free_port()  # nothing listens there: connection refused
    good = lab.sink()
    lab.start({"corp": {"domains": "corp.example", "tls": "none",
                        "smarthost": "127.0.0.1:%d, 127.0.0.1:%d" % (closed, good.port)}})
    subject = unique("failover")
    sent = message(subject, "user@corp.example", extra_headers=(
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        "X-Folded: first part of a long value,\r\n\tcontinued on a second line",
        "X-Twice: one", "X-Twice: two",
        "Content-Type: text/plain; charset=us-ascii",
    ), body="Hello.\r\n.a line starting with a dot\r\n.\r\n..two dots\r\nend\r\n")
    queue_id = lab.send(["user@corp.example"], sent)

    assert good.wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(queue_id)
    [record] = good.messages
    assert record["mail_from"] == SENDER and record["rcpt_to"] == ["user@corp.example"]
    assert record["helo"] == h.HOSTNAME
    check_received_then(record["message"], sent, queue_id, "user@corp.example")
    # Dot-stuffed on the wire, exactly once.
    assert b"\r\n..a line starting with a dot\r\n..\r\n...two dots\r\n" in record["data"]
    # The first smarthost was tried and refused, then the second one took it.
    assert log_line(lab.gw, r"connection refused by 127\.0\.0\.1:%d\b" % closed), lab.gw.describe()
    assert log_line(lab.gw, r"%s to=<user@corp\.example> route=corp delivered: 250 2\.0\.0" % queue_id)
    assert good.connections == 1
    assert lab.dsn.messages == []
    lab.finish()


# --- 2-4. MX ------------------------------------------------------------------------------------


def test_mx_preference_order_and_fallback(lab):
    port, mx = lab.mx_sinks({
        "127.0.0.2": {"rcpt_default": (451, "4.3.0 Busy, try the next MX")},  # fallback.example 10
        "127.0.0.3": {},  # fallback.example 20
        "127.0.0.4": {},  # ordered.example 10
        "127.0.0.5": {},  # ordered.example 20
    })
    zone = lab.dns
    # Highest preference added first: the answer order is not the preference order.
    for domain, low, high in (("fallback.example", "127.0.0.2", "127.0.0.3"),
                              ("ordered.example", "127.0.0.4", "127.0.0.5")):
        zone.add(domain, "MX", (20, "mx20." + domain))
        zone.add(domain, "MX", (10, "mx10." + domain))
        zone.add("mx10." + domain, "A", low)
        zone.add("mx20." + domain, "A", high)
    lab.start({"internet": {"domains": "*", "mx": "yes"}}, mx_port=port)

    fallback_msg = message(unique("mx fallback"), "user@fallback.example")
    ordered_msg = message(unique("mx ordered"), "user@ordered.example")
    fallback_id = lab.send(["user@fallback.example"], fallback_msg)
    ordered_id = lab.send(["user@ordered.example"], ordered_msg)

    assert mx["127.0.0.3"].wait_for_messages(1, WAIT), lab.gw.describe()
    assert mx["127.0.0.4"].wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(fallback_id)
    lab.wait_gone(ordered_id)
    # fallback.example: MX 10 was asked first and said 451 to the recipient, MX 20 took it.
    assert commands(mx["127.0.0.2"], b"RCPT") == [b"RCPT TO:<user@fallback.example>\r\n"]
    assert mx["127.0.0.2"].messages == []
    [record] = mx["127.0.0.3"].messages
    assert record["rcpt_to"] == ["user@fallback.example"]
    assert record["message"].endswith(fallback_msg)
    # ordered.example: both good, MX 10 took it and MX 20 was never contacted.
    [record] = mx["127.0.0.4"].messages
    assert record["rcpt_to"] == ["user@ordered.example"]
    assert record["message"].endswith(ordered_msg)
    assert mx["127.0.0.5"].connections == 0
    assert zone.count("fallback.example", "MX") >= 1 and zone.count("ordered.example", "MX") >= 1
    assert lab.dsn.messages == []
    lab.finish()


def test_implicit_mx(lab):
    port, mx = lab.mx_sinks({"127.0.0.6": {}})
    lab.dns.add("implicit.example", "A", "127.0.0.6")  # no MX record at all
    lab.start({"internet": {"domains": "*", "mx": "yes"}}, mx_port=port)
    sent = message(unique("implicit mx"), "user@implicit.example")
    queue_id = lab.send(["user@implicit.example"], sent)
    assert mx["127.0.0.6"].wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(queue_id)
    [record] = mx["127.0.0.6"].messages
    assert record["rcpt_to"] == ["user@implicit.example"]
    assert record["message"].endswith(sent)
    assert lab.dns.count("implicit.example", "MX") >= 1  # asked for MX first, then the address
    assert lab.dns.count("implicit.example", "A") >= 1
    assert lab.dsn.messages == []
    lab.finish()


def test_null_mx_bounces_with_5_1_10(lab):
    lab.dns.add("nullmx.example", "MX", (0, "."))
    lab.start({"internet": {"domains": "*", "mx": "yes"}})
    subject = unique("null mx")
    queue_id = lab.send(["user@nullmx.example"], message(subject, "user@nullmx.example"))

    [dsn] = lab.wait_dsns(1)
    lab.wait_gone(queue_id)
    assert len(dsn.recipients) == 1, [fields(block) for block in dsn.recipients]
    rcpt = fields(dsn.recipients[0])
    assert rcpt["Final-Recipient"] == "rfc822; user@nullmx.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.10"
    assert "null MX" in rcpt["Diagnostic-Code"], rcpt
    assert "Remote-MTA" not in rcpt  # no server was contacted
    assert fields(dsn.per_message)["X-Mailgate-Queue-ID"] == queue_id
    assert "Subject: %s" % subject in dsn.headers
    assert "<user@nullmx.example>:" in dsn.text
    lab.finish()


# --- 5-6. TLS policies -------------------------------------------------------------------------------


def test_tls_required_without_starttls_defers(lab):
    plain = lab.sink()  # offers no STARTTLS
    lab.start({"secure": {"domains": "secure.example", "tls": "required",
                          "smarthost": "127.0.0.1:%d" % plain.port}}, delivery={"retry": "1h"})
    queue_id = lab.send(["user@secure.example"], message(unique("tls required"), "user@secure.example"))

    state = lab.wait_deferred(queue_id)
    outcome = state["recipients"]["user@secure.example"]
    assert (outcome["outcome"], outcome["code"], outcome["status"]) == ("deferred", 451, "4.7.4"), state
    h.spool_entry(lab.spool, queue_id, "deferred")  # whole, crc ok
    assert plain.connections == 1
    assert commands(plain, b"EHLO") and not commands(plain, b"MAIL"), plain.commands
    assert plain.messages == []
    assert lab.dsn.messages == []
    lab.finish()


def test_tls_verify_checks_the_hostname(lab, tmp_path):
    ca = make_ca(str(tmp_path / "ca"))
    right_cert, right_key = ca.issue("relay.right.example", str(tmp_path / "right"))
    wrong_cert, wrong_key = ca.issue("someone-else.example", str(tmp_path / "wrong"))
    right = lab.sink(starttls=True, cert=right_cert, key=right_key)
    wrong = lab.sink(starttls=True, cert=wrong_cert, key=wrong_key)
    lab.dns.add("relay.right.example", "A", "127.0.0.1")
    lab.dns.add("relay.wrong.example", "A", "127.0.0.1")  # its certificate names someone else
    lab.start({
        "right": {"domains": "right-dest.example", "tls": "verify",
                  "smarthost": "relay.right.example:%d" % right.port},
        "wrong": {"domains": "wrong-dest.example", "tls": "verify",
                  "smarthost": "relay.wrong.example:%d" % wrong.port},
    }, delivery={"retry": "1h"}, tls={"ca_file": ca.ca_path})
    wrong_id = lab.send(["user@wrong-dest.example"], message(unique("verify wrong"), "user@wrong-dest.example"))
    sent = message(unique("verify right"), "user@right-dest.example")
    right_id = lab.send(["user@right-dest.example"], sent)

    # The wrong name: deferred, and nothing was said after STARTTLS (no plaintext fallback).
    state = lab.wait_deferred(wrong_id)
    outcome = state["recipients"]["user@wrong-dest.example"]
    assert (outcome["outcome"], outcome["code"], outcome["status"]) == ("deferred", 451, "4.7.5"), state
    assert commands(wrong, b"STARTTLS") and not commands(wrong, b"MAIL"), wrong.commands
    assert wrong.messages == []
    # The right name: delivered over TLS.
    assert right.wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(right_id)
    [record] = right.messages
    assert record["tls"] in ("TLSv1.2", "TLSv1.3"), record["tls"]
    assert record["rcpt_to"] == ["user@right-dest.example"]
    assert record["message"].endswith(sent)
    assert lab.dsn.messages == []
    lab.finish()


# --- 7-10. outcomes --------------------------------------------------------------------------------


def test_retry_after_451(lab):
    flaky = lab.sink(per_connection=[{"rcpt_default": (451, "4.3.0 Try again later")}])
    lab.start({"flaky": {"domains": "retry.example", "tls": "none",
                         "smarthost": "127.0.0.1:%d" % flaky.port}}, delivery={"retry": "1s"})
    sent = message(unique("retry"), "user@retry.example")
    queue_id = lab.send(["user@retry.example"], sent)

    assert flaky.wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(queue_id)
    [record] = flaky.messages
    assert record["connection"] == 1  # the first connection got the 451, the retry delivered
    assert record["message"].endswith(sent)
    assert flaky.connections == 2
    assert log_line(lab.gw, r"%s to=<user@retry\.example> route=flaky deferred: 451 4\.3\.0" % queue_id)
    assert log_line(lab.gw, r"%s to=<user@retry\.example> route=flaky delivered: 250" % queue_id)
    assert lab.dsn.messages == []
    lab.finish()


def test_one_recipient_of_three_refused(lab):
    sink = lab.sink(rcpt={"bad@dest.example": (550, "5.1.1 No such user")})
    lab.start({"dest": {"domains": "dest.example", "tls": "none",
                        "smarthost": "127.0.0.1:%d" % sink.port}})
    subject = unique("one of three")
    recipients = ["good1@dest.example", "bad@dest.example", "good2@dest.example"]
    sent = message(subject, "good1@dest.example")
    queue_id = lab.send(recipients, sent)

    assert sink.wait_for_messages(1, WAIT), lab.gw.describe()
    [dsn] = lab.wait_dsns(1)
    lab.wait_gone(queue_id)
    [record] = sink.messages
    assert record["rcpt_to"] == ["good1@dest.example", "good2@dest.example"]
    assert record["message"].endswith(sent)

    assert len(dsn.recipients) == 1, [fields(block) for block in dsn.recipients]
    rcpt = fields(dsn.recipients[0])
    assert rcpt["Final-Recipient"] == "rfc822; bad@dest.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert fields(dsn.per_message)["X-Mailgate-Queue-ID"] == queue_id
    assert "Subject: %s" % subject in dsn.headers
    assert "Message-ID: <" in dsn.headers and "Hello." not in dsn.headers  # headers only
    assert "<bad@dest.example>:" in dsn.text and "good1@dest.example" not in dsn.text
    assert dsn.message["Subject"] == "Undelivered Mail Returned to Sender"
    lab.finish()


def test_expiry_bounces_with_4_4_7(lab):
    busy = lab.sink(rcpt_default=(451, "4.2.0 Mailbox busy"))
    lab.start({"busy": {"domains": "busy.example", "tls": "none",
                        "smarthost": "127.0.0.1:%d" % busy.port}},
              delivery={"retry": "1s", "max_lifetime": "3s"})
    subject = unique("expiry")
    started = time.monotonic()
    queue_id = lab.send(["user@busy.example"], message(subject, "user@busy.example"))

    [dsn] = lab.wait_dsns(1)
    elapsed = time.monotonic() - started
    lab.wait_gone(queue_id)
    assert elapsed >= 2.5, "bounced %.1fs after it was sent, before max_lifetime = 3s" % elapsed
    rcpt = fields(dsn.recipients[0])
    assert len(dsn.recipients) == 1
    assert rcpt["Final-Recipient"] == "rfc822; user@busy.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    assert "expired" in rcpt["Diagnostic-Code"] and "Mailbox busy" in rcpt["Diagnostic-Code"], rcpt
    assert "Subject: %s" % subject in dsn.headers
    assert busy.connections >= 2  # it was retried before it expired
    assert busy.messages == []
    assert h.read_state(lab.spool, queue_id) is None  # no state left behind either
    lab.finish()


def test_no_dsn_for_the_null_sender(lab):
    sink = lab.sink(rcpt={"bad@dest.example": (550, "5.1.1 No such user")})
    lab.start({"dest": {"domains": "dest.example", "tls": "none",
                        "smarthost": "127.0.0.1:%d" % sink.port},
               # A notice wrongly made for <> would have somewhere to go (and be seen) too.
               "everything-else": {"domains": "*", "tls": "none",
                                   "smarthost": "127.0.0.1:%d" % sink.port}})
    null_id = lab.send(["bad@dest.example"], message(unique("from <>"), "bad@dest.example"), sender="")
    lab.wait_gone(null_id)
    assert log_line(lab.gw, r"%s to=<bad@dest\.example> route=dest bounced: 550 5\.1\.1" % null_id)
    assert b"MAIL FROM:<>\r\n" in [line for _, line in sink.commands]

    # The same refusal for a message with a sender does make a DSN: this configuration would
    # have delivered one, had the first message deserved it.
    control_subject = unique("control")
    control_id = lab.send(["bad@dest.example"], message(control_subject, "bad@dest.example"))
    [dsn] = lab.wait_dsns(1)
    lab.wait_gone(control_id)
    assert fields(dsn.per_message)["X-Mailgate-Queue-ID"] == control_id
    assert "Subject: %s" % control_subject in dsn.headers
    notices = [line for line in lab.gw.stdout_lines if "notice queued" in line]
    assert len(notices) == 1 and control_id in notices[0], notices
    assert sink.messages == []
    # The DSN, delivered, leaves the spool too; nothing else was ever queued.
    h.wait_until(lambda: not h.queued_ids(lab.spool), WAIT,
                 lambda: "an empty spool: %s" % h.spool_listing(lab.spool))
    lab.finish()
    assert len(lab.dsn.messages) == 1


# --- 11. DKIM -----------------------------------------------------------------------------------


def test_dkim_signature_verifies(lab, tmp_path):
    keys = str(tmp_path / "dkim")
    os.makedirs(keys)
    made = h.run_cli("dkim-keygen", SENDER_DOMAIN, "e2e", "--out", keys)
    assert made.returncode == 0, made.stdout + made.stderr
    key_path = os.path.join(keys, "e2e.%s.key" % SENDER_DOMAIN)
    assert os.path.isfile(key_path)
    record = next(line for line in made.stdout.splitlines() if " IN TXT " in line)
    owner, txt = record.split(" IN TXT ", 1)
    assert owner == "e2e._domainkey.%s." % SENDER_DOMAIN, record
    value = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', txt))
    assert value.startswith("v=DKIM1;") and "p=" in value, value
    lab.dns.add(owner, "TXT", value)

    port, mx = lab.mx_sinks({"127.0.0.7": {}})
    lab.dns.add("dkim-dest.example", "MX", (10, "mx.dkim-dest.example"))
    lab.dns.add("mx.dkim-dest.example", "A", "127.0.0.7")
    lab.start({"internet": {"domains": "*", "mx": "yes"}}, mx_port=port,
              dkim={"sign_domains": SENDER_DOMAIN, "selector": "e2e", "private_key": key_path})
    sent = message(unique("dkim"), "user@dkim-dest.example",
                   extra_headers=("Date: Mon, 01 Jan 2024 10:00:00 +0000", "MIME-Version: 1.0"))
    queue_id = lab.send(["user@dkim-dest.example"], sent)
    assert mx["127.0.0.7"].wait_for_messages(1, WAIT), lab.gw.describe()
    lab.wait_gone(queue_id)
    delivered = mx["127.0.0.7"].messages[0]["message"]

    parsed = email.message_from_bytes(delivered, policy=email.policy.compat32)
    assert parsed.keys()[:2] == ["DKIM-Signature", "Received"], parsed.keys()
    tags = dict(tag.strip().split("=", 1) for tag in
                re.sub(r"\s+", "", parsed["DKIM-Signature"]).split(";") if tag.strip())
    assert tags["d"] == SENDER_DOMAIN and tags["s"] == "e2e" and tags["a"] == "rsa-sha256", tags
    assert delivered.endswith(sent)

    def dnsfunc(name, timeout=5):
        """TXT records from the TEST DNS server only (never the system resolver)."""
        resolver = lab.dns.dnspython_resolver(lifetime=timeout)
        name = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout as e:
            raise dkim.DnsTimeoutError(str(e))
        return b"".join(answer.rrset[0].strings)

    before = lab.dns.count(owner, "TXT")
    assert dkim.verify(delivered, dnsfunc=dnsfunc), "DKIM-Signature does not verify"
    assert lab.dns.count(owner, "TXT") > before  # the key came from the test DNS server
    tampered = delivered.replace(b"Hello.", b"Hullo.")
    assert tampered != delivered
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)
    lab.finish()


# --- 12. kill -9 during delivery -------------------------------------------------------------------


class SlowSink(Sink):
    """
    A sink that records each message as soon as its final dot arrives, and answers the 250 only
    `delay` seconds later: a gateway killed in between has not been told, so the message is
    recorded here but in flight for the gateway (it may deliver it again after a restart).
    """

    def __init__(self, delay, **behaviour):
        Sink.__init__(self, **behaviour)
        self.delay = delay
        self._stopping = threading.Event()

    def _transaction(self, record, accepted):
        Sink._transaction(self, record, accepted)
        self._stopping.wait(self.delay)  # the sink's behaviour, not a test's wait

    def stop(self):
        self._stopping.set()
        Sink.stop(self)


MESSAGES = 20
KILL_AT = 6  # slow deliveries recorded by the sink when the gateway is killed


def subject_of(record):
    return email.message_from_bytes(record["message"], policy=email.policy.compat32)["Subject"]


def idle(sink):
    """No session of sink is open (tests.sinks keeps the open ones in _open)."""
    with sink._lock:
        return not sink._open


def deliveries(*sinks_):
    """Counter of (recipient, subject) over the messages recorded by sinks_."""
    counter = collections.Counter()
    for sink in sinks_:
        for record in list(sink.messages):
            for rcpt in record["rcpt_to"]:
                counter[(rcpt, subject_of(record))] += 1
    return counter


def test_kill9_during_delivery_then_restart(lab):
    """
    20 messages, each for one recipient behind a slow smarthost (250 after 0.5 s, 4 connections at
    a time) and one behind a fast one.  kill -9 once the slow sink has recorded KILL_AT messages,
    then restart with the slow route pointing at a fast sink.  Every recipient must be delivered
    at least once; one whose outcome the gateway had saved before the kill (its message removed,
    or "delivered" in its state file) exactly once; duplicates only among the few in flight.
    """
    slow = lab.sink(SlowSink, delay=0.5)
    fast = lab.sink()

    def routes(slow_port):
        return {"slow": {"domains": "slow.example", "tls": "none",
                         "smarthost": "127.0.0.1:%d" % slow_port},
                "fast": {"domains": "fast.example", "tls": "none",
                         "smarthost": "127.0.0.1:%d" % fast.port}}

    delivery = {"retry": "1s", "per_destination_concurrency": "4", "concurrency": "20",
                "command_timeout": "10s", "data_timeout": "10s"}
    lab.start(routes(slow.port), delivery=delivery)
    token = secrets.token_hex(4)
    acked = {}  # queue id -> (subject, recipients)
    client = h.smtp(lab.gw.ports["relay"])
    try:
        for n in range(MESSAGES):
            subject = "kill9 %s n%02d" % (token, n)
            rcpts = ["m%02d@slow.example" % n, "m%02d@fast.example" % n]
            queue_id = h.transaction(client, SENDER, rcpts, message(subject, rcpts[0]))
            acked[queue_id] = (subject, rcpts)
    finally:
        h.close(client)
    expected = {(rcpt, subject) for subject, rcpts in acked.values() for rcpt in rcpts}

    assert slow.wait_for_messages(KILL_AT, WAIT), lab.gw.describe()
    assert lab.gw.kill9() == -9
    # The gateway is dead.  Let the sinks finish with what had reached them (a final dot still in
    # a socket buffer is read and recorded after the kill): then they are frozen, like the spool.
    h.wait_until(lambda: idle(slow) and idle(fast), WAIT, "the sinks' sessions to end")
    recorded = deliveries(slow, fast)
    remaining = h.queued_ids(lab.spool)
    saved = set()  # recipients whose delivery the gateway had made durable
    for queue_id, (subject, rcpts) in acked.items():
        if queue_id not in remaining:
            saved.update((rcpt, subject) for rcpt in rcpts)
            continue
        state = h.read_state(lab.spool, queue_id) or {"recipients": {}}
        for rcpt, outcome in state["recipients"].items():
            if outcome.get("outcome") == "delivered":
                saved.add((rcpt, subject))
    in_flight = set(recorded) - saved  # recorded by a sink, the gateway not knowing it yet
    assert len(recorded) < len(expected), "everything was delivered before the kill: no test"
    assert remaining, "nothing left in the spool at the kill: no test"
    assert saved <= set(recorded), "outcome saved as delivered but never received: %s" % (
        sorted(saved - set(recorded))[:5],)
    # Per recipient, not per message: messages still queued whose fast recipient is done.
    assert any(rcpt.endswith("@fast.example") and queue_id in remaining
               for queue_id, (subject, rcpts) in acked.items() for rcpt in rcpts
               if (rcpt, subject) in saved), "no message was partly delivered at the kill"

    slow.stop()
    fixed = lab.sink()
    lab.start(routes(fixed.port), delivery=delivery)  # same spool, the slow route fixed

    def all_delivered():
        return expected <= set(deliveries(slow, fast, fixed)) and not h.queued_ids(lab.spool)

    h.wait_until(all_delivered, 30, lambda: "every recipient delivered and the spool empty: "
                 "missing %s, spool %s\n%s" % (sorted(expected - set(deliveries(slow, fast, fixed)))[:5],
                                               h.spool_listing(lab.spool), lab.gw.describe()))
    total = deliveries(slow, fast, fixed)
    assert set(total) == expected, sorted(set(total) - expected)[:5]
    twice_saved = {key: count for key, count in total.items() if key in saved and count != 1}
    assert not twice_saved, "delivered again although its outcome was saved: %s" % twice_saved
    duplicates = {key: count for key, count in total.items() if count > 1}
    assert set(duplicates) <= in_flight, duplicates
    assert sum(count - 1 for count in duplicates.values()) <= len(in_flight), (duplicates, in_flight)
    assert len(in_flight) <= 2 * 4  # per_destination_concurrency for each of the two routes
    assert lab.dsn.messages == []
    lab.finish()
    print("kill -9 with %d of %d recipients recorded, %d saved, %d in flight; %d delivered again"
          % (len(recorded), len(expected), len(saved), len(in_flight),
             sum(count - 1 for count in duplicates.values())))
