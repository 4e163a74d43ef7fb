"""
End to end: kill -9 the gateway while clients are sending, restart it on the same spool, and
check that every message that got a 250 is queued (in active/, or in deferred/ once delivery has
tried it), complete and intact, that nothing partial is left anywhere, and that recovery empties
tmp/.  Outbound mail is held (harness.Holding: a route for every domain to a sink answering 451),
so delivery moves messages from active/ to deferred/ while the clients send, and never removes one.

Eight client threads each loop sending small messages over one session (reconnecting when it
breaks); each records the queue id of every 250.  The gateway is killed twice, at two different
moments (after 100 acknowledged messages, then after 40 more on the restarted gateway).
"""

import secrets
import smtplib
import threading
import time

import pytest

from tests.e2e import harness as h

THREADS = 8
KILL_AFTER = (100, 40)  # acknowledged messages (in that round) before each kill -9
ROUND_TIMEOUT = 60.0


class Round:
    """The client threads of one round and what they saw."""

    def __init__(self, port, token, round_no, kill_after):
        self.port = port
        self.token = token
        self.round_no = round_no
        self.kill_after = kill_after
        self.stop = threading.Event()
        self.killed = threading.Event()
        self.enough = threading.Event()
        self.lock = threading.Lock()
        self.acked = {}  # queue id -> subject
        self.unexpected = []  # replies other than 250 to a well-formed transaction
        self.disconnects = 0
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True,
                                         name="crash-client-%d" % i) for i in range(THREADS)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def finish(self, timeout=20.0):
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, "client threads did not stop: %s" % alive

    def _record(self, queue_id, subject):
        with self.lock:
            assert queue_id not in self.acked, "queue id %s given twice" % queue_id
            self.acked[queue_id] = subject
            if len(self.acked) >= self.kill_after:
                self.enough.set()

    def _client(self, index):
        n = 0
        while not self.stop.is_set():
            client = None
            try:
                client = h.smtp(self.port, timeout=10)
                client.ehlo()
                while not self.stop.is_set():
                    subject = "crash-test %s r%d t%d n%d" % (self.token, self.round_no, index, n)
                    n += 1
                    # Two threads send ~100 KB messages, so a kill can land in the middle of a write.
                    lines = 1300 if index % 4 == 0 else 1
                    body = ("message %d of thread %d " % (n, index)).ljust(76, "x") + "\r\n"
                    message = h.make_message(subject, body=body * lines)
                    code, text = client.mail("sender@example.org")
                    if code == 250:
                        code, text = client.rcpt("user@example.com")
                    if code == 250:
                        code, text = client.data(message)
                    if code == 250:
                        self._record(h.queue_id_of(code, text), subject)
                    else:
                        with self.lock:
                            self.unexpected.append((code, text))
                        client.rset()
            except (OSError, smtplib.SMTPException) as e:
                with self.lock:
                    if self.killed.is_set():
                        self.disconnects += 1  # the kill -9: expected
                    else:
                        self.unexpected.append(("disconnected before the kill", repr(e)))
                return
            except Exception as e:  # noqa: BLE001 - record, and let the test fail on it
                with self.lock:
                    self.unexpected.append(("exception", repr(e)))
                return
            finally:
                if client is not None:
                    client.close()


SETTLE_TIMEOUT = 30.0


def settle(spool, gateway):
    """
    Wait until delivery has tried every queued message once: all of them in deferred/ (held: the
    next attempt is an hour away), so that nothing writes to the spool any more.
    """
    h.wait_until(lambda: not h.spool_listing(spool)["active"], SETTLE_TIMEOUT,
                 lambda: "active/ to drain into deferred/: %s\n%s"
                 % (h.spool_listing(spool)["active"][:10], gateway.describe()))


def check_spool(spool, acked):
    """What must be true of the spool after a crash, a restart and settle()."""
    listing = h.spool_listing(spool)
    assert listing["tmp"] == [], "tmp/ not empty: %s" % listing["tmp"][:10]
    assert listing["corrupt"] == [], "entries set aside as corrupt: %s" % listing["corrupt"][:10]
    for state in ("hold", "quarantine"):
        assert listing[state] == [], (state, listing[state][:10])
    queued = set(listing["active"]) | set(listing["deferred"])
    assert not set(listing["active"]) & set(listing["deferred"]), "in active/ and deferred/ at once"
    missing = sorted(set(acked) - queued)
    assert not missing, "%d acknowledged messages lost, e.g. %s" % (len(missing), missing[:5])
    bad = []
    for name in sorted(queued):
        try:
            entry = h.spool_entry(spool, name)
        except h.BadEntry as e:  # a partial or damaged file: the one thing that must never be
            bad.append(str(e))
            continue
        message = entry.message()
        assert message.keys()[0] == "Received", (name, message.keys())
        assert entry.body.startswith(b"Received: from %s ([127.0.0.1])" % h.CLIENT_HELO.encode())
        assert (" id %s" % name) in message["Received"], message["Received"]
        assert entry.envelope["sender"] == "sender@example.org"
        assert entry.envelope["recipients"] == ["user@example.com"]
        assert entry.envelope["size"] == len(entry.body)
        if name in acked:
            assert message["Subject"] == acked[name], (name, message["Subject"], acked[name])
        else:
            # Queued but not acknowledged (killed between the rename and the 250): still whole.
            assert message["Subject"].startswith("crash-test "), message["Subject"]
    assert not bad, "partial or damaged entries in active/ or deferred/:\n" + "\n".join(bad[:10])
    return queued


@pytest.fixture
def holding():
    holding = h.Holding().start()
    yield holding
    holding.stop()


@pytest.fixture
def gateway(tmp_path, holding):
    gw = h.Gateway(str(tmp_path / "gw"))
    yield gw
    gw.cleanup()


def test_kill9_while_sending_loses_nothing_acknowledged(gateway, holding):
    token = secrets.token_hex(4)
    config = {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com", "max_message_size": "1M"},
        "queue": {"path": "spool"},
        "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                           "tls": "none", "auth": "none"},
    }
    config.update(holding.sections())
    spool = gateway.path("spool")
    gateway.start(config)
    all_acked = {}
    rounds = []
    leftovers = []  # files in tmp/ right after each crash (recovery must remove them)
    for round_no, kill_after in enumerate(KILL_AFTER, 1):
        senders = Round(gateway.ports["relay"], token, round_no, kill_after)
        rounds.append(senders)
        senders.start()
        try:
            reached = senders.enough.wait(ROUND_TIMEOUT)
            assert reached, "only %d messages acknowledged in %.0fs (round %d)\n%s" % (
                len(senders.acked), ROUND_TIMEOUT, round_no, gateway.describe())
            alive = sum(t.is_alive() for t in senders.threads)
            senders.killed.set()
            status = gateway.kill9()  # clients are still sending: some are mid-transaction
        finally:
            senders.finish()
        assert status == -9, gateway.describe()
        assert alive == THREADS, "clients had stopped before the kill (round %d)" % round_no
        assert not senders.unexpected, senders.unexpected[:5]
        assert len(senders.acked) >= kill_after
        overlap = set(all_acked) & set(senders.acked)
        assert not overlap, overlap
        all_acked.update(senders.acked)

        # What the crash left (before recovery): whatever is in active/ or deferred/ must already
        # be whole.
        crashed = h.spool_listing(spool)
        for state in h.QUEUED_DIRS:
            for name in crashed[state]:
                h.spool_entry(spool, name, state)
        leftovers.append(len(crashed["tmp"]))

        gateway.start()  # same spool; waits for every listener and "queue ready"
        # Recovery ran before "queue ready": nothing the crash left in tmp/ is there any more.
        # (Delivery starts right after recovery and writes state files through tmp/, so tmp/ is
        # only checked to be empty once it has settled.)
        survivors = set(crashed["tmp"]) & set(h.spool_listing(spool)["tmp"])
        assert not survivors, "tmp/ not emptied by recovery: %s" % sorted(survivors)[:10]
        settle(spool, gateway)
        check_spool(spool, all_acked)

    # After both crashes the gateway still works and still has everything.
    client = h.smtp(gateway.ports["relay"])
    try:
        last = h.transaction(client, "sender@example.org", ["user@example.com"],
                             h.make_message("crash-test %s after" % token))
    finally:
        h.close(client)
    all_acked[last] = "crash-test %s after" % token
    settle(spool, gateway)
    gateway.stop()
    assert gateway.stopped_cleanly(), gateway.describe()
    queued = check_spool(spool, all_acked)
    assert len(all_acked) >= sum(KILL_AFTER) + 1
    assert len(queued) >= len(all_acked)
    assert holding.sink.messages == []  # held: nothing was delivered
    assert "Traceback" not in gateway.all_output(), gateway.all_output()[-5000:]
    listing = h.spool_listing(spool)
    print("acknowledged %d, queued %d (active/ %d, deferred/ %d), tmp/ leftovers after the crashes"
          " %s, disconnects seen by clients %s"
          % (len(all_acked), len(queued), len(listing["active"]), len(listing["deferred"]),
             leftovers, [r.disconnects for r in rounds]))
