"""
End to end: the real gateway under faults it must survive while serving everyone else.

- Disk full, for real: the spool is a 2 MiB tmpfs mounted for the test (as root; CI runs as root)
  and filled but for a page.  Messages get 451 4.3.0, never 250; delivery's state files fail too;
  /healthz says "No space left on device" while it lasts (what the receivers found, not only the
  main process's small probe); once space returns, the next message is accepted and
  /healthz is 200 again, without a restart.
- DNS dead (nothing listening) or hanging (the loopback server never answers): every session
  ends within its timeouts, with the SPF filter's temperror reply where it asks for one, and a
  message routed by MX is deferred with 4.4.3, never lost and never hung.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e import harness as h

SENDER = "sender@sender.example"


def healthz(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def send(port, subject, size=1000):
    """One message on a new session: (code, text) of the end of DATA (or of the refusal)."""
    client = h.smtp(port)
    try:
        client.ehlo()
        code, text = client.mail(SENDER)
        if code != 250:
            return code, text
        code, text = client.rcpt("user@example.com")
        if code != 250:
            return code, text
        body = ("x" * 76 + "\r\n") * (size // 78 + 1)
        return client.data(h.make_message(subject, sender=SENDER, body=body))
    except smtplib_errors() as e:
        return getattr(e, "smtp_code", -1), str(e).encode()
    finally:
        h.close(client)


def smtplib_errors():
    import smtplib

    return (smtplib.SMTPException,)


@pytest.fixture
def tmpfs():
    """A 2 MiB tmpfs, unmounted afterwards."""
    assert os.geteuid() == 0, "the disk-full test mounts a tmpfs: it needs root (CI runs as root)"
    root = tempfile.mkdtemp(prefix="mailgate-full-")
    mount = os.path.join(root, "spool")
    os.mkdir(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mount],
                   check=True, capture_output=True)
    try:
        yield root, mount
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def fill(directory):
    """Fill the file system holding directory; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    # Whatever is left (less than a page) is not enough for a message.
    return path


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                    reason="mounts a tmpfs: needs root (CI runs as root)")
def test_disk_full_is_451_and_healthz_says_why_until_space_returns(tmpfs):
    root, spool = tmpfs
    holding = h.Holding().start()
    gw = h.Gateway(os.path.join(root, "gw"))
    metrics = h.free_port()
    config = {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com"},
        "queue": {"path": spool},
        "metrics": {"endpoint": "tcp:%d:interface=127.0.0.1" % metrics},
        "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                           "tls": "none", "auth": "none", "filters": ""},
    }
    config.update(holding.sections(retry="2s"))
    try:
        gw.start(config)
        port = gw.ports["relay"]
        code, text = send(port, "before")
        queued_before = h.queue_id_of(code, text)
        assert healthz(metrics) == (200, "ok\n")
        spare = os.path.join(spool, "spare")
        with open(spare, "wb") as f:
            f.write(b"\0" * 4096)
        filler = fill(spool)
        # One page free again (as when a delivery's state file is replaced just after the disk
        # filled): the main process's probe fits in it, the messages do not.
        os.unlink(spare)
        answers = [send(port, "full %d" % i, size=20000) for i in range(5)]
        assert all(code == 451 for code, _ in answers), answers
        assert all(text.startswith(b"4.3.0 ") for _, text in answers), answers
        status, body = healthz(metrics)
        assert status == 503, body
        assert "No space left on device (ENOSPC)" in body, body
        # Delivery keeps trying the queued message (the sink says 451): its state file cannot
        # be written either, and the gateway goes on.
        time.sleep(3)
        assert gw.running
        assert h.queued_state(spool, queued_before) is not None
        os.unlink(filler)  # space returns
        code, text = send(port, "after")
        after = h.queue_id_of(code, text)
        h.wait_until(lambda: healthz(metrics) == (200, "ok\n"), 20, "/healthz back to ok")
        queued = h.queued_ids(spool)
        assert queued_before in queued and after in queued, queued
        # Never a 250 for a message that is not there: the five refused ones left nothing.
        assert len(queued) == 2, queued
        assert os.listdir(os.path.join(spool, "tmp")) == []
        assert "Spool %s: writes work again" % spool in gw.stdout
        assert "Traceback" not in gw.stdout, gw.stdout
    finally:
        gw.cleanup()
        holding.stop()


class DNSLab(h.Lab):
    def prepare(self):
        self.mx = self.sink()

    def config(self, nameserver, spf_tempfail):
        return {
            "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com"},
            "queue": {"path": "spool"},
            "dns": {"nameservers": nameserver, "timeout": "2s"},
            "filters": {"timeout": "10s"},
            "spf": {"tempfail_on_error": "yes" if spf_tempfail else "no"},
            "delivery": {"retry": "1h", "delay_warning": "0"},
            "listener:mx": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                            "tls": "none", "auth": "none", "filters": "spf, dkim, dmarc",
                            "command_timeout": "30s", "limit_exempt_ips": ""},
            "listener:out": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                             "tls": "none", "auth": "none", "filters": "",
                             "relay_ips": "127.0.0.1/32"},
            "route:internet": {"domains": "*", "mx": "yes", "tls": "none"},
        }


def dead_port():
    """A loopback UDP and TCP port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["dead", "hanging"])
def test_dns_dead_or_hanging_ends_every_session_in_time(tmp_path, how):
    lab = DNSLab(str(tmp_path))
    try:
        if how == "dead":
            nameserver = "127.0.0.1:%d" % dead_port()
        else:
            for name in ("sender.example", "remote.example", "client.test.example",
                         "127.0.0.1", "1.0.0.127.in-addr.arpa"):
                lab.dns.hang(name)
            nameserver = "%s:%d" % lab.dns.address
        lab.gw.start(lab.config(nameserver, spf_tempfail=True))
        started = time.monotonic()
        client = h.smtp(lab.gw.ports["mx"], timeout=60)
        client.ehlo()
        code, text = client.mail(SENDER)
        elapsed = time.monotonic() - started
        h.close(client)
        assert (code, text[:6]) == (451, b"4.7.24"), (code, text)  # SPF's temperror reply
        assert elapsed < 25, elapsed  # within the DNS and filter timeouts, not hung

        # Without tempfail_on_error the message is taken (SPF/DMARC temperror recorded), and
        # delivery by MX cannot resolve: deferred with 4.4.3, still queued.
        lab.gw.stop()
        lab.gw.start(lab.config(nameserver, spf_tempfail=False))
        started = time.monotonic()
        client = h.smtp(lab.gw.ports["mx"], timeout=60)
        code, text = client.sendmail(SENDER, ["user@example.com"],
                                     h.make_message("through", sender=SENDER)), None
        h.close(client)
        assert time.monotonic() - started < 40
        client = h.smtp(lab.gw.ports["out"], timeout=60)
        queue_id = h.transaction(client, SENDER, ["someone@remote.example"],
                                 h.make_message("outbound", sender=SENDER))
        h.close(client)
        spool = lab.gw.path("spool")
        h.wait_until(lambda: h.queued_state(spool, queue_id) == "deferred", 30,
                     "the MX delivery deferred")
        state = h.read_state(spool, queue_id)
        [outcome] = [r for r in state["recipients"].values()]
        assert outcome["status"] == "4.4.3", outcome
        assert lab.gw.running
    finally:
        lab.close()
