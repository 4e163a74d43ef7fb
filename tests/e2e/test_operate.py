"""
End to end: operating the real gateway (twistd) while it runs: every `mailgate queue` command
through `python -m mailgate.cli ... --config FILE` against deferred mail, and reloads, by SIGHUP
and by `mailgate reload`, with sessions open and with a broken configuration.

Each test has its own gateway, a loopback test DNS server (nothing asks the system resolver) and
sinks: `held` answers every RCPT with 451 (mail stays deferred), `dsn` accepts the notices sent
to the senders' domain, and the reload tests' `old` and `new` accept what the route sends them.
Nothing sleeps: sinks are waited on, the spool is polled with a deadline, log lines are awaited.
"""

import json
import os
import signal

import pytest

from tests.e2e import harness as h

SENDER = "sender@sender.example"
WAIT = 15.0


class Lab(h.Lab):
    """A sink holding mail with 451, one for DSNs."""

    def prepare(self):
        self.held = self.sink(rcpt_default=h.HOLD_REPLY)
        self.dsn = self.sink()

    def config(self, route_to, max_recipients=5, extra=None):
        """ini text: one relay listener, DSNs to self.dsn, everything else to route_to."""
        config = {
            "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com"},
            "queue": {"path": "spool"},
            "dns": {"nameservers": "%s:%d" % self.dns.address, "timeout": "2s"},
            "delivery": {"retry": "1h", "delay_warning": "0", "connect_timeout": "5s"},
            "listener:relay": {"endpoint": "tcp:%s:interface=127.0.0.1" % self.port, "role": "relay",
                               "tls": "none", "auth": "none", "relay_ips": "127.0.0.1/32",
                               "filters": "", "max_recipients": max_recipients},
            "route:senders": {"domains": "sender.example", "tls": "none",
                              "smarthost": "127.0.0.1:%d" % self.dsn.port},
            "route:out": {"domains": "*", "tls": "none",
                          "smarthost": "127.0.0.1:%d" % route_to.port},
        }
        config.update(extra or {})
        return h.render_config(config)

    port = None

    def start(self, route_to, **kw):
        self.port = h.free_port()
        self.gw.start(self.config(route_to, **kw))
        return self.gw

    def rewrite(self, text):
        with open(self.gw.config_path, "w") as f:
            f.write(text)

    def cli(self, *args):
        return h.run_cli(*args, "--config", self.gw.config_path)

    def send(self, subject, recipients=("user@remote.example",)):
        client = h.smtp(self.gw.ports["relay"])
        try:
            return h.transaction(client, SENDER, list(recipients),
                                 h.make_message(subject, sender=SENDER, to=recipients[0]))
        finally:
            h.close(client)

    def wait_deferred(self, queue_id):
        def deferred():
            return h.queued_state(self.spool, queue_id) == "deferred" and h.read_state(self.spool, queue_id)

        return h.wait_until(deferred, WAIT, lambda: "%s in deferred/: %s\n%s" % (
            queue_id, h.spool_listing(self.spool), self.gw.describe()))

    def wait_rcpts(self, sink, count):
        h.wait_until(lambda: len(rcpts(sink)) >= count, WAIT, lambda: "%d RCPTs at the sink, got %d\n%s"
                     % (count, len(rcpts(sink)), self.gw.describe()))

    def finish(self):
        self.gw.stop()
        assert self.gw.stopped_cleanly(), self.gw.describe()
        assert "Traceback" not in self.gw.all_output(), self.gw.describe()
        for sink in self.sinks:
            assert not sink.errors, sink.errors


def rcpts(sink):
    return [line for _, line in sink.commands if line.upper().startswith(b"RCPT")]


@pytest.fixture
def lab(tmp_path):
    lab = Lab(str(tmp_path))
    try:
        yield lab
    finally:
        lab.close()


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def test_every_queue_command(lab):
    lab.start(lab.held)
    ids = [lab.send("operate %d" % i) for i in range(3)]
    for queue_id in ids:
        lab.wait_deferred(queue_id)
    assert len(rcpts(lab.held)) == 3
    one, two, three = ids

    # list: the postqueue-like table, and JSON
    table = ok(lab.cli("queue", "list")).splitlines()
    assert table[0].split() == ["Queue", "ID", "Size", "Age", "State", "Sender/Recipients"]
    for queue_id in ids:
        [line] = [line for line in table if line.startswith(queue_id)]
        assert line.split()[3:] == ["deferred", SENDER]
    assert table.count(" " * 42 + "user@remote.example") == 3
    assert table.count(" " * 44 + "(451 4.3.0 Held by the test harness [127.0.0.1])") == 3
    assert table[-1].startswith("-- ") and table[-1].endswith(" in 3 requests.")
    listed = json.loads(ok(lab.cli("queue", "list", "--json")))
    assert sorted(m["id"] for m in listed) == sorted(ids)
    assert {m["recipients"][0]["code"] for m in listed} == {451}

    # show
    shown = ok(lab.cli("queue", "show", one))
    assert "Queue ID:    %s\nState:       deferred\n" % one in shown
    assert "  user@remote.example\n      deferred: 451 4.3.0 Held by the test harness [127.0.0.1]" in shown
    assert "  Subject: operate 0\n" in shown
    assert json.loads(ok(lab.cli("queue", "show", one, "--json")))["attempts"] == 1

    # hold: out of deferred/, not retried by flush; list --state held
    assert ok(lab.cli("queue", "hold", one)) == "%s: held (was deferred)\n" % one
    assert os.path.exists(os.path.join(lab.spool, "hold", one))
    held = ok(lab.cli("queue", "list", "--state", "held")).splitlines()
    assert held[1].split()[0] == one and held[1].split()[3] == "held"

    # flush one, then all (the held one is not among them)
    assert ok(lab.cli("queue", "flush", two)) == "flushed 1 message: retrying now\n"
    lab.wait_rcpts(lab.held, 4)
    assert ok(lab.cli("queue", "flush")) == "flushed 2 messages: retrying now\n"
    lab.wait_rcpts(lab.held, 6)
    h.wait_until(lambda: h.read_state(lab.spool, three)["attempts"] == 2, WAIT, "the second attempt")

    # release: delivered (tried) at once, deferred again by the 451
    assert ok(lab.cli("queue", "release", one)) == "%s: released from held\n" % one
    lab.wait_rcpts(lab.held, 7)
    h.wait_until(lambda: (h.read_state(lab.spool, one) or {}).get("attempts") == 2, WAIT,
                 "the released message's attempt")
    lab.wait_deferred(one)

    # bounce: a DSN with 5.0.0 to the sender, the message gone
    out = ok(lab.cli("queue", "bounce", two))
    assert out.startswith("%s: bounced 1 recipient; notice to the sender queued as " % two)
    assert lab.dsn.wait_for_messages(1, WAIT), lab.gw.describe()
    dsn = lab.dsn.messages[0]
    assert dsn["mail_from"] == "" and dsn["rcpt_to"] == [SENDER]
    text = dsn["message"].decode("utf-8", "replace")
    assert "Status: 5.0.0" in text and "Action: failed" in text
    flat = " ".join(text.split())  # the notice folds long lines
    assert "Delivery cancelled by the administrator; last error: Held by the test harness" in flat
    h.wait_until(lambda: two not in h.queued_ids(lab.spool), WAIT, "the bounced message to go")

    # delete: gone, nobody told
    assert ok(lab.cli("queue", "delete", three)) == "%s: deleted\n" % three
    assert three not in h.queued_ids(lab.spool)
    assert h.read_state(lab.spool, three) is None
    assert [m["id"] for m in json.loads(ok(lab.cli("queue", "list", "--json")))] == [one]

    # errors: one line, exit 1
    result = lab.cli("queue", "show", "NOSUCH")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "mailgate: no message NOSUCH in the queue\n")
    result = lab.cli("queue", "release", one)
    assert result.returncode == 1
    assert result.stderr == "mailgate: %s is not held or quarantined (it is deferred)\n" % one

    socket_path = os.path.join(lab.spool, "admin.sock")
    assert os.path.exists(socket_path)
    lab.finish()
    assert not os.path.exists(socket_path)  # removed when the gateway stops
    assert len(lab.dsn.messages) == 1
    for args in (("queue", "list"), ("reload",)):
        result = lab.cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", "mailgate: no gateway is running (no admin socket at %s)\n" % socket_path)


def test_sighup_with_a_changed_route_and_an_open_session(lab):
    old = lab.sink()
    new = lab.sink()
    lab.start(old, max_recipients=2)
    lab.send("before")
    assert old.wait_for_messages(1, WAIT), lab.gw.describe()

    # A session that is in the middle of a transaction when the configuration changes.
    client = h.smtp(lab.gw.ports["relay"])
    try:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("a@remote.example")[0] == 250
        lab.rewrite(lab.config(new, max_recipients=1))
        lab.gw.process.send_signal(signal.SIGHUP)
        lab.gw.wait_for_line(r"configuration reloaded from .*mailgate\.ini", timeout=WAIT)
        # Its settings are those it started with: a second recipient (max_recipients was 2).
        assert client.rcpt("b@remote.example")[0] == 250
        code, text = client.data(h.make_message("during", sender=SENDER, to="a@remote.example"))
        assert code == 250, text
    finally:
        h.close(client)

    # A new session gets the new settings; what is delivered now takes the new route.
    client = h.smtp(lab.gw.ports["relay"])
    try:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("c@remote.example")[0] == 250
        assert client.rcpt("d@remote.example")[0] == 452
        code, text = client.data(h.make_message("after", sender=SENDER, to="c@remote.example"))
        assert code == 250, text
    finally:
        h.close(client)
    assert new.wait_for_messages(2, WAIT), lab.gw.describe()
    subjects = sorted(m["message"].split(b"Subject: ")[1].split(b"\r\n")[0] for m in new.messages)
    assert subjects == [b"after", b"during"]
    assert len(old.messages) == 1
    lab.finish()


def test_a_broken_config_is_refused_and_the_old_one_keeps_running(lab):
    old = lab.sink()
    new = lab.sink()
    lab.start(old)
    good = lab.config(old)

    # SIGHUP: refused, logged in one line, still serving with the old settings.
    lab.rewrite(good + "\n[gateway]\nbogus = 1\n")
    lab.gw.process.send_signal(signal.SIGHUP)
    line = lab.gw.wait_for_line(r"reload refused", timeout=WAIT)
    assert "reload refused: %s: " % lab.gw.config_path in line
    assert line.endswith("; the running configuration stays")
    assert lab.gw.running
    lab.send("still old")
    assert old.wait_for_messages(1, WAIT), lab.gw.describe()

    # mailgate reload: the same refusal, as its exit status and one line.
    lab.rewrite(lab.config(new).replace("[route:out]", "[route:out]\nsmarthost_typo = 1"))
    result = lab.cli("reload")
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr == "mailgate: %s: [route:out] smarthost_typo: unknown key\n" % lab.gw.config_path
    lab.send("old again")
    assert old.wait_for_messages(2, WAIT), lab.gw.describe()

    # Fixed: applied.
    lab.rewrite(lab.config(new))
    assert ok(lab.cli("reload")) == "%s: reloaded\n" % lab.gw.config_path
    lab.send("new at last")
    assert new.wait_for_messages(1, WAIT), lab.gw.describe()
    assert len(old.messages) == 2
    lab.finish()
