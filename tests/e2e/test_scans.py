"""
End to end: the real gateway as the internet sees it.

- Open-relay sweep: every classic relay-test form (percent hack, bang paths, source routes,
  quoted local parts holding "@", IP literals, trailing dots, upper case, our own hostname and
  IP literal, postmaster without a domain) sent to a relay listener by a client that may not
  relay: none is accepted for a foreign domain, and nothing is queued for one.
- nmap's smtp-open-relay script finds no open relay.
- testssl (testssl.sh) against the STARTTLS submission listener and the implicit-TLS listener:
  no SSLv2/SSLv3/TLS 1.0/1.1, no weak cipher, no known vulnerability.  Its summary is printed.

nmap and testssl are required: .ci/run installs them (Debian packages nmap and testssl.sh).
"""

import json
import os
import shutil
import subprocess

import pytest

from tests.e2e import harness as h
from tests.tlsutil import make_ca

FOREIGN = "victim.example"
BAD_SEVERITIES = ("MEDIUM", "HIGH", "CRITICAL")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scans"))
    holding = h.Holding().start()
    gw = h.Gateway(os.path.join(root, "gw"))
    ca = make_ca(os.path.join(root, "ca"))
    cert, key = h.issue_server_cert(ca, os.path.join(root, "tls"))
    users = os.path.join(root, "users")
    from mailgate.smtp.auth import set_user

    set_user(users, "alice@example.com", "secret")
    config = h.base_config(gw.directory, cert, key, users, holding)
    # The relay listener as the internet's MX: nobody may relay (relay_ips only 127.0.0.2).
    # nmap's smtp-open-relay makes its 16 attempts in one session: more refusals than the
    # default max_errors (10) allows before closing.
    config["listener:relay"].update({"filters": "", "max_errors": "40"})
    try:
        gw.start(config)
        yield gw
    finally:
        gw.cleanup()
        holding.stop()


RELAY_FORMS = [
    "user@%s" % FOREIGN,
    "user@%s." % FOREIGN,
    "USER@VICTIM.EXAMPLE",
    "user%%%s@example.com" % FOREIGN,
    "user%%%s@EXAMPLE.COM" % FOREIGN,
    "user%%%s@[127.0.0.1]" % FOREIGN,
    "user%%%s@%s" % (FOREIGN, h.HOSTNAME),
    "%s!user@example.com" % FOREIGN,
    "%s!user" % FOREIGN,
    "%s!user@[127.0.0.1]" % FOREIGN,
    "@example.com:user@%s" % FOREIGN,
    "@%s:user@%s" % (h.HOSTNAME, FOREIGN),
    "@[127.0.0.1]:user@%s" % FOREIGN,
    "@%s,@example.com:user@%s" % (h.HOSTNAME, FOREIGN),
    '"user@%s"@example.com' % FOREIGN,
    '"user%%%s"@example.com' % FOREIGN,
    '"user@%s"' % FOREIGN,
    '"user@%s"@[127.0.0.1]' % FOREIGN,
    "user@%s@example.com" % FOREIGN,
    "user@example.com@%s" % FOREIGN,
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@127.0.0.1",
    "user@%s" % h.HOSTNAME,
    "user@%s." % h.HOSTNAME.upper(),
    "user@localhost",
    "user@sub.example.com",
    "user@example.com.%s" % FOREIGN,
    "user@%s:25" % FOREIGN,
    "<user@%s>" % FOREIGN,  # doubled brackets
    "user@%s " % FOREIGN,
    "postmaster@%s" % FOREIGN,
    "postmaster%%%s@example.com" % FOREIGN,
]


def rcpt_reply(client, recipient):
    code, text = client.docmd("RCPT TO:<%s>" % recipient)
    return code, text.decode("latin-1")


def test_open_relay_sweep(gateway):
    accepted = []
    for form in RELAY_FORMS:  # a session each: refusals count toward max_errors
        client = h.smtp(gateway.ports["relay"])
        try:
            client.ehlo()
            code, _ = client.mail("probe@outside.example")
            assert code == 250
            code, text = rcpt_reply(client, form)
            if code < 400:
                accepted.append((form, code, text))
        finally:
            h.close(client)
    assert accepted == [], accepted
    client = h.smtp(gateway.ports["relay"])
    try:
        client.ehlo()
        # Ours is still ours: the exact domain, and the bare postmaster (RFC 5321 4.5.1).
        client.mail("probe@outside.example")
        assert rcpt_reply(client, "user@example.com")[0] == 250
        assert rcpt_reply(client, "postmaster")[0] == 250
        assert rcpt_reply(client, "Postmaster")[0] == 250
        client.rset()
    finally:
        h.close(client)
    # Nothing for a foreign domain was queued.
    for queue_id in h.queued_ids(gateway.path("spool")):
        entry = h.spool_entry(gateway.path("spool"), queue_id)
        assert all(r.endswith("@example.com") for r in entry.envelope["recipients"]), entry


def _require(program):
    path = shutil.which(program)
    assert path, "%s is missing: .ci/run installs it (apt-get install %s)" % (
        program, {"testssl": "testssl.sh"}.get(program, program))
    return path


def test_nmap_finds_no_open_relay(gateway, tmp_path):
    nmap = _require("nmap")
    port = gateway.ports["relay"]
    # The script runs on ports nmap knows as SMTP: tell it ours is (instead of a slow -sV).
    services = tmp_path / "nmap-services"
    services.write_text("smtp\t%d/tcp\t0.5\n" % port)
    result = subprocess.run(
        # (--servicedb scans the ports it lists: only ours.)
        [nmap, "-n", "-Pn", "--servicedb", str(services),
         "--script", "smtp-open-relay",
         # domain: the foreign domain it tries to relay to (relaytest@DOMAIN and its tricks).
         "--script-args", "smtp-open-relay.domain=%s,smtp-open-relay.ip=127.0.0.1" % FOREIGN,
         "127.0.0.1"],
        capture_output=True, text=True, timeout=300)
    print("\nnmap smtp-open-relay:\n" + result.stdout)
    assert result.returncode == 0, result.stderr
    assert "smtp-open-relay" in result.stdout, result.stdout
    assert "Server doesn't seem to be an open relay, all tests failed" in result.stdout, result.stdout
    assert "Server is an open relay" not in result.stdout


def run_testssl(target, starttls, directory):
    program = _require("testssl")
    out = os.path.join(directory, "testssl-%s.json" % ("starttls" if starttls else "implicit"))
    argv = [program, "--quiet", "--color", "0", "--nodns", "none", "--warnings", "off",
            "--openssl-timeout", "10", "-p", "-s", "-f", "-P", "-U", "--jsonfile", out]
    if starttls:
        argv += ["--starttls", "smtp"]
    result = subprocess.run(argv + [target], capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    with open(out) as f:
        findings = json.load(f)
    return result, findings


def summary(findings):
    """The protocols, cipher categories, forward secrecy and vulnerability lines, in a table."""
    keep = ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipherlist_", "FS",
            "cipher_order", "heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego",
            "secure_client_renego", "CRIME_TLS", "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32",
            "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13", "RC4", "protocol_negotiated",
            "cipher_negotiated")
    return ["%-22s %-8s %s" % (f["id"], f["severity"], f["finding"]) for f in findings
            if f["id"].startswith(keep)]


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_testssl_finds_no_weak_protocol_cipher_or_vulnerability(gateway, listener, tmp_path):
    target = "127.0.0.1:%d" % gateway.ports[listener]
    result, findings = run_testssl(target, listener == "submission", str(tmp_path))
    lines = summary(findings)
    print("\ntestssl %s (%s):\n%s" % (listener, "STARTTLS" if listener == "submission" else
                                       "implicit TLS", "\n".join(lines)))
    by_id = {f["id"]: f for f in findings}
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert by_id[old]["finding"].startswith("not offered"), by_id[old]
    assert by_id["TLS1_2"]["finding"].startswith("offered"), by_id["TLS1_2"]
    assert by_id["TLS1_3"]["finding"].startswith("offered"), by_id["TLS1_3"]
    bad = [f for f in findings if f["severity"] in BAD_SEVERITIES]
    assert bad == [], bad
    for vulnerability in ("heartbleed", "CCS", "ROBOT", "secure_client_renego", "CRIME_TLS",
                          "POODLE_SSL", "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13",
                          "RC4"):
        assert by_id[vulnerability]["severity"] in ("OK", "INFO"), by_id[vulnerability]
