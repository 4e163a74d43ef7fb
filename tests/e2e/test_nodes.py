"""
End to end: two real gateway processes (twistd) sharing one PostgreSQL queue (a throwaway cluster,
tests/pgcluster.py; the schema made by `mailgate db-upgrade`).  A node killed with kill -9 before
delivering has its mail delivered by the other once the lease (3s here) runs out; with both
healthy, 500 messages are delivered once each; queue commands on one node act on the other's
mail; PostgreSQL stopped and started under load: no 250 without a commit, /healthz 503 and 451
4.3.0 meanwhile, and every acknowledged message delivered afterwards.
"""

import os
import re
import smtplib
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests import pgcluster, sinks
from tests.dnsserver import TestDNS
from tests.e2e import harness as h

LEASE = "3s"


def subject_of(message):
    match = re.search(rb"^Subject: (.*)\r$", message["message"], re.MULTILINE)
    return match.group(1).decode() if match else None


def delivered_subjects(sink):
    return [subject_of(m) for m in list(sink.messages)]


class Site:
    """A database, a DNS server, sinks, and gateways named a, b, ... in root."""

    def __init__(self, root, cluster=None):
        self.root = root
        self.cluster = cluster or pgcluster.shared()
        self.dsn = self.cluster.new_database()
        self.dns = TestDNS()
        self.dns.start_thread()
        self.sinks = []
        self.gateways = {}

    def sink(self, **behaviour):
        sink = sinks.Sink(**behaviour)
        sink.start()
        self.sinks.append(sink)
        return sink

    def config(self, node, sink, **extra):
        config = {
            "gateway": {"hostname": "%s.test.example" % node, "accepted_domains": "example.com"},
            "queue": {"backend": "postgresql", "dsn": self.dsn, "node_id": node, "lease": LEASE,
                      "path": "spool", "pool_size": "4"},
            "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                               "tls": "none", "auth": "none", "relay_ips": "127.0.0.0/8",
                               "filters": ""},
            "dns": {"nameservers": "%s:%d" % self.dns.address, "timeout": "2s"},
            "delivery": {"retry": "1h", "delay_warning": "0"},
            "route:all": {"domains": "*", "smarthost": "%s:%d" % (sink.host, sink.port),
                          "tls": "none"},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        return config

    def gateway(self, node, sink, **extra):
        gw = h.Gateway(os.path.join(self.root, node))
        self.gateways[node] = gw
        gw.start(self.config(node, sink, **extra))
        return gw

    def upgrade(self):
        gw = h.Gateway(os.path.join(self.root, "upgrade"))
        h.write_config(gw.config_path, _fill(self.config("upgrade", self.sink())))
        result = h.run_cli("db-upgrade", "--config", gw.config_path)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def queue_cli(self, node, *args):
        result = h.run_cli("queue", *args, "--config", self.gateways[node].config_path)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def close(self):
        try:
            for gw in self.gateways.values():
                gw.cleanup()
            for sink in self.sinks:
                sink.stop()
        finally:
            self.dns.stop_thread()
            try:
                self.cluster.drop_database(self.dsn)
            except Exception:
                pass

    def check_clean_output(self):
        for node, gw in self.gateways.items():
            output = gw.all_output()
            at = output.find("Traceback")
            assert at < 0, output[max(0, at - 600):at + 2500]


@pytest.fixture
def site(tmp_path):
    s = Site(str(tmp_path))
    try:
        yield s
    finally:
        s.close()


def send(port, subjects, to="user@example.com"):
    """One session sending a message per subject; returns {subject: queue id}."""
    client = h.smtp(port)
    try:
        return {subject: h.transaction(client, "sender@example.org", [to], h.make_message(subject))
                for subject in subjects}
    finally:
        h.close(client)


def test_a_gateway_refuses_a_database_without_the_schema_until_db_upgrade(site, tmp_path):
    sink = site.sink()
    gw = h.Gateway(str(tmp_path / "early"))
    h.write_config(gw.config_path, _fill(site.config("early", sink)))
    result = h.run_twistd(gw.config_path)
    lines = h.meaningful_lines(result.stderr)
    assert result.returncode == 1, result
    assert lines == ["mailgate: %s: [queue] dsn: the database has no mailgate schema: run "
                     "`mailgate db-upgrade --config %s`" % (gw.config_path, gw.config_path)], lines
    assert "applied migration 1" in site.upgrade()
    assert "nothing to do" in site.upgrade()


def _fill(config):
    return h._fill_ports(h.render_config(config))


def test_a_dead_nodes_mail_is_delivered_by_the_other_after_the_lease(site):
    site.upgrade()
    stuck = site.sink(hang=True)  # node a's next hop never answers: a is mid-delivery
    good = site.sink()
    a = site.gateway("a", stuck)
    [queue_id] = send(a.ports["relay"], ["to be taken over"]).values()
    h.wait_until(lambda: stuck.connections >= 1, 20, "node a connecting to its next hop")
    # b starts only now: woken by NOTIFY, a running b may claim the new mail before a does (any
    # node may deliver any message), and this test is about a lease held by a dead node
    site.gateway("b", good)
    listing = site.queue_cli("b", "list")
    assert queue_id in listing and "(being delivered by a, lease for" in listing, listing
    assert good.messages == []  # b leaves it alone while a renews its lease
    a.kill9()
    killed = time.monotonic()
    assert good.wait_for_messages(1, timeout=30)
    waited = time.monotonic() - killed
    assert waited >= 1.0, waited  # not before a's lease ran out
    assert delivered_subjects(good) == ["to be taken over"]
    h.wait_until(lambda: "Mail queue is empty" in site.queue_cli("b", "list"), 20,
                 "the queue to be empty")
    site.check_clean_output()


def test_two_healthy_nodes_deliver_500_messages_once_each(site):
    site.upgrade()
    sink = site.sink()
    a = site.gateway("a", sink)
    b = site.gateway("b", sink)
    subjects = ["m%03d" % i for i in range(500)]
    acknowledged = {}
    errors = []

    def client(part, port):
        try:
            acknowledged.update(send(port, part))
        except Exception as e:  # reported below
            errors.append(repr(e))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(subjects[i::4], (a, b)[i % 2].ports["relay"]))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and len(acknowledged) == 500
    assert sink.wait_for_messages(500, timeout=90), len(sink.messages)
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # anything delivered twice would show up now
    got = delivered_subjects(sink)
    assert sorted(got) == subjects, (len(got), len(set(got)))
    assert elapsed < 60, elapsed
    h.wait_until(lambda: "Mail queue is empty" in site.queue_cli("a", "list"), 20, "an empty queue")
    for gw in (a, b):
        gw.stop()
        assert gw.stopped_cleanly(), gw.describe()
    site.check_clean_output()


def test_queue_commands_on_one_node_act_on_the_others_mail(site):
    site.upgrade()
    holding = site.sink(rcpt_default=h.HOLD_REPLY)
    site.gateway("a", holding)
    site.gateway("b", holding)
    ids = send(site.gateways["a"].ports["relay"], ["held one", "deleted one", "bounced one"])

    def deferred_everywhere():
        listing = site.queue_cli("b", "list")
        return all(qid in listing for qid in ids.values()) and "being delivered" not in listing \
            and listing.count("Held by the test harness") == 3

    h.wait_until(deferred_everywhere, 30, lambda: site.queue_cli("b", "list"))
    held = ids["held one"]
    assert "held (was deferred)" in site.queue_cli("b", "hold", held)
    assert "No held messages" not in site.queue_cli("a", "list", "--state", "held")
    assert held in site.queue_cli("a", "list", "--state", "held")
    assert "State:       held" in site.queue_cli("a", "show", held)
    assert "released from held" in site.queue_cli("a", "release", held)
    assert "deleted" in site.queue_cli("b", "delete", ids["deleted one"])
    assert ids["deleted one"] not in site.queue_cli("a", "list")
    bounced = site.queue_cli("b", "bounce", ids["bounced one"])
    assert "bounced 1 recipient" in bounced, bounced
    assert "flushed" in site.queue_cli("b", "flush")
    site.check_clean_output()


def health(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def test_postgresql_stopped_and_started_under_load(tmp_path):
    cluster = pgcluster.Cluster()
    cluster.start()
    s = Site(str(tmp_path), cluster)
    try:
        s.upgrade()
        sink = s.sink()
        metrics = h.free_port()
        a = s.gateway("a", sink, metrics={"endpoint": "tcp:%d:interface=127.0.0.1" % metrics})
        b = s.gateway("b", sink)
        assert health(metrics)[0] == 200
        acknowledged, refused, errors = {}, [], []
        stop = threading.Event()

        def load(n, port):
            i = 0
            while not stop.is_set():
                try:
                    client = h.smtp(port)
                except OSError as e:
                    errors.append(repr(e))
                    return
                try:
                    client.ehlo()
                    while not stop.is_set():
                        subject = "load-%d-%d" % (n, i)
                        i += 1
                        code, text = client.mail("sender@example.org")
                        if code == 250:
                            code, text = client.rcpt("user@example.com")
                        if code == 250:
                            code, text = client.data(h.make_message(subject))
                        else:
                            client.rset()
                        if code == 250:
                            acknowledged[subject] = h.queue_id_of(code, text)
                        else:
                            refused.append((code, text))
                except smtplib.SMTPDataError as e:
                    refused.append((e.smtp_code, e.smtp_error))
                except smtplib.SMTPServerDisconnected:
                    pass  # max_errors 451s in a row: 421 and closed; a new session
                except (smtplib.SMTPException, OSError) as e:
                    errors.append(repr(e))
                finally:
                    h.close(client)

        threads = [threading.Thread(target=load, args=(n, (a, b)[n % 2].ports["relay"]))
                   for n in range(4)]
        for thread in threads:
            thread.start()
        h.wait_until(lambda: len(acknowledged) >= 40, 30, lambda: "some mail accepted: %s %s" % (errors[:3], refused[:3]))
        cluster.stop("fast")
        before = len(acknowledged)
        status, body = h.wait_until(lambda: (lambda r: r if r[0] == 503 else None)(health(metrics)),
                                    30, "/healthz to say 503")
        assert "queue not writable: database unreachable" in body, body
        h.wait_until(lambda: any(code == 451 for code, _ in refused), 30, "a 451 at end of data")
        assert all((code, text[:5]) in ((451, b"4.3.0"), (421, b"4.7.0")) for code, text in refused), \
            refused[:3]
        time.sleep(1.0)
        cluster.start()
        h.wait_until(lambda: health(metrics)[0] == 200, 30, "/healthz to recover by itself")
        h.wait_until(lambda: len(acknowledged) >= before + 40, 60, "mail accepted again")
        stop.set()
        for thread in threads:
            thread.join(60)
        assert errors == [], errors[:3]
        want = set(acknowledged)
        h.wait_until(lambda: want <= set(delivered_subjects(sink)), 90,
                     lambda: "%d acknowledged messages undelivered"
                     % len(want - set(delivered_subjects(sink))))
        for gw in (a, b):
            gw.stop()
        s.check_clean_output()
    finally:
        s.close()
        cluster.destroy()
