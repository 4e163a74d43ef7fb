"""
The README's embedding example runs as printed: `python embed.py` serves mail from
Gateway.from_config inside its own reactor, and Ctrl-C stops it.  The public names a filter
author imports keep working.
"""

import os
import signal
import smtplib
import subprocess
import sys
import time

from tests import REPO
from tests.dnsserver import TestDNS
from tests.e2e import harness as h


def readme_example(heading):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def test_public_names_keep_working():
    from mailgate import Gateway  # noqa: F401
    from mailgate.errors import ConfigError  # noqa: F401
    from mailgate.interfaces import IAuthBackend, IFilter, IQueue  # noqa: F401
    from mailgate.message import Message  # noqa: F401
    from mailgate.session import Session  # noqa: F401
    from mailgate.verdict import AuthResult, Verdict  # noqa: F401

    assert callable(Gateway.from_config)


def test_readme_embedding_example_serves_mail(tmp_path):
    code = readme_example("## Embedding mailgate in a Twisted program")
    assert 'Gateway.from_config("etc/mailgate.ini", reactor=reactor)' in code
    port = h.free_port()
    dns = TestDNS()
    dns.start_thread()
    try:
        config = {
            "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com"},
            "queue": {"path": "spool"},
            "dns": {"nameservers": "%s:%d" % dns.address},
            "listener:relay": {"endpoint": "tcp:%d:interface=127.0.0.1" % port, "role": "relay",
                               "tls": "none", "auth": "none", "filters": ""},
            "route:hold": {"domains": "*", "smarthost": "127.0.0.1:%d" % h.free_port(),
                           "tls": "none"},
        }
        os.makedirs(tmp_path / "etc")
        h.write_config(str(tmp_path / "etc" / "mailgate.ini"), config)
        (tmp_path / "embed.py").write_text(code)
        child = subprocess.Popen([sys.executable, "embed.py"], cwd=str(tmp_path), env=h.child_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert child.poll() is None, child.stdout.read().decode()
                try:
                    client = smtplib.SMTP("127.0.0.1", port, local_hostname=h.CLIENT_HELO, timeout=10)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the embedded gateway never listened"
                    time.sleep(0.05)
            try:
                code, banner = client.ehlo()
                assert code == 250
                refused = client.sendmail("a@example.org", ["u@example.com"], h.make_message("hi"))
                assert refused == {}
            finally:
                client.quit()
            assert len(h.queued_ids(str(tmp_path / "etc" / "spool"))) == 1
            child.send_signal(signal.SIGINT)  # "Ctrl-C stops it"
            assert child.wait(timeout=20) is not None
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        dns.stop_thread()
