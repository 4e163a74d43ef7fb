"""
mailgate diagnose against the loopback test DNS server (tests/dnsserver.py, in a thread) and SMTP
sinks on 127.0.0.2, .3, ... sharing one port, the [delivery] mx_port of the test configuration.

Every lookup goes to the test DNS server: the configuration names it in [dns] nameservers, and
the no_system_resolver guard (from test_checktls) fails any test that reaches for the system's.
"""

import base64
import os
import subprocess
import sys

import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgate.ops import diagnose
from mailgate.ops.checktls import FAIL, INFO, OK, WARN, Finding
from mailgate.config import DNSConfig
from tests import sinks as sinkmodule
from tests.dnsserver import TestDNS
from tests.ops.test_checktls import (  # noqa: F401 (no_system_resolver is an autouse fixture)
    REPO, findings, no_system_resolver, run, statuses,
)
from tests.tlsutil import make_ca


def PortSink(host, port, **behaviour):
    """A sink on a chosen port: the MX sinks of one domain share [delivery] mx_port."""
    return sinkmodule.Sink(host=host, port=port, **behaviour)


def _start_sinks(specs):
    """Start one PortSink per (host, behaviour) on one common port; retried if a port is taken."""
    for attempt in range(20):
        started = []
        try:
            port = 0
            for host, behaviour in specs:
                sink = PortSink(host, port, **behaviour)
                sink.start()
                started.append(sink)
                port = sink.port
            return port, started
        except OSError:
            for sink in started:
                sink.stop()
    raise RuntimeError("no port free on every address")


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _rsa_p(bits):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _b64(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    ca = make_ca(root)
    certs = {
        "mx1": ca.issue("mx1.good.test", os.path.join(root, "mx1")),
        "mx2": ca.issue("mx2.good.test", os.path.join(root, "mx2")),
        "bad": ca.issue("mx.badcert.test", os.path.join(root, "bad"), expired=True),
    }

    def tls(name):
        return dict(starttls=True, cert=certs[name][0], key=certs[name][1])

    port, started = _start_sinks([
        ("127.0.0.2", tls("mx1")), ("127.0.0.3", tls("mx2")), ("127.0.0.4", tls("bad")),
        ("127.0.0.5", {}),
    ])
    sinks = dict(zip(("mx1", "mx2", "bad", "plain"), started))

    zone = TestDNS()
    zone.add("mx1.good.test", "A", "127.0.0.2")
    zone.add("mx2.good.test", "A", "127.0.0.3")
    zone.add("mx.badcert.test", "A", "127.0.0.4")
    zone.add("mx.plain.test", "A", "127.0.0.5")

    rsa_p = _rsa_p(2048)

    def mail_domain(domain, mx=("mx1.good.test",), spf="v=spf1 mx -all",
                    dmarc="v=DMARC1; p=reject; rua=mailto:dmarc@%s", selector=None):
        for preference, host in enumerate(mx):
            zone.add(domain, "MX", ((preference + 1) * 10, host))
        if spf:
            zone.add(domain, "TXT", spf)
        if dmarc:
            zone.add("_dmarc." + domain, "TXT", dmarc % domain if "%s" in dmarc else dmarc)
        if selector:
            zone.add("sel._domainkey." + domain, "TXT", selector)

    # All good: two MX (added in reverse order), SPF with an include, DKIM, DMARC, MTA-STS.
    zone.add("good.test", "MX", (20, "mx2.good.test"))
    zone.add("good.test", "MX", (10, "mx1.good.test"))
    zone.add("good.test", "TXT", "google-site-verification=abc")
    zone.add("good.test", "TXT", "v=spf1 mx include:_spf.good.test -all")
    zone.add("_spf.good.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 ~all")
    zone.add("sel._domainkey.good.test", "TXT", "v=DKIM1; k=rsa; p=" + rsa_p)
    zone.add("_dmarc.good.test", "TXT",
             "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@good.test")
    zone.add("_mta-sts.good.test", "TXT", "v=STSv1; id=20240101T000000")

    zone.add("null.test", "MX", (0, "."))
    zone.add("null.test", "TXT", "v=spf1 -all")
    zone.add("_dmarc.null.test", "TXT", "v=DMARC1; p=reject")
    mail_domain("nodmarc.test", dmarc=None)
    mail_domain("manyspf.test", spf="v=spf1 include:s1.manyspf.test include:s2.manyspf.test"
                " include:s3.manyspf.test -all")
    for n in (1, 2, 3):
        zone.add("s%d.manyspf.test" % n, "TXT", "v=spf1 a mx a:other.manyspf.test -all")
    mail_domain("baddkim.test", selector="v=DKIM1; k=rsa; p=" + _b64(b"this is not a key"))
    mail_domain("badcert.test", mx=("mx1.good.test", "mx.badcert.test"))
    mail_domain("plain.test", mx=("mx.plain.test",))
    zone.fail("servfail.test", "SERVFAIL")
    dns_port = zone.start_thread()

    config = os.path.join(root, "mailgate.ini")
    with open(config, "w") as f:
        f.write(
            "[gateway]\nhostname = gw.example.test\n\n"
            "[listener:mx]\nendpoint = tcp:2525:interface=127.0.0.1\nrole = relay\n"
            "tls = none\nauth = none\n\n"
            "[tls]\nca_file = %s\n\n"
            "[dns]\nnameservers = 127.0.0.1:%d\ntimeout = 2s\n\n"
            "[delivery]\nmx_port = %d\n" % (ca.ca_path, dns_port, port)
        )
    yield dict(zone=zone, sinks=sinks, port=port, config=config, ca=ca, root=root, rsa_p=rsa_p)
    zone.stop_thread()
    for sink in started:
        sink.stop()
        assert sink.errors == []


def run_diagnose(capsys, world, domain, *extra):
    code, out, err = run(capsys, "diagnose", domain, "--config", world["config"],
                         "--timeout", 5, *extra)
    by_check, parsed = findings(out)
    assert err == ""
    assert "Traceback" not in out
    return code, by_check, parsed


def bad(parsed):
    return [(status, check, text) for status, check, text in parsed
            if status not in (OK, INFO)]


# --- whole domains through the command ---------------------------------------------------------


def test_good_domain(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "good.test", "--selector", "sel")
    assert bad(parsed) == []
    assert code == 0
    assert by_check["mx"] == [(OK, "2 MX records: 10 mx1.good.test, 20 mx2.good.test")]
    assert by_check["mx1.good.test addresses"] == [
        (OK, "127.0.0.2"),
        (INFO, "no IPv6 address (AAAA record): senders reach mx1.good.test over IPv4 only"),
    ]
    for host, address in (("mx1.good.test", "127.0.0.2"), ("mx2.good.test", "127.0.0.3")):
        label = "%s[%s]" % (host, address)
        for check in ("banner", "starttls", "tls", "hostname", "expiry", "chain"):
            assert statuses(by_check, "%s %s" % (label, check)) == [OK], check
        assert by_check["%s hostname" % label] == [(OK, "the certificate covers %s" % host)]
    assert by_check["spf"] == [(OK, "one SPF record: v=spf1 mx include:_spf.good.test -all")]
    assert statuses(by_check, "spf syntax") == [OK]
    assert by_check["spf lookups"][0][0] == OK
    assert by_check["spf lookups"][0][1].startswith("2 DNS-querying terms")
    assert by_check["dkim sel"] == [(OK, "sel._domainkey.good.test: rsa 2048-bit key")]
    assert by_check["dmarc"] == [(OK, "one DMARC record at _dmarc.good.test: v=DMARC1;"
                                   " p=reject; sp=quarantine; rua=mailto:dmarc@good.test")]
    assert by_check["dmarc policy"] == [
        (OK, "p=reject: receivers reject mail that fails DMARC"),
        (INFO, "sp=quarantine for subdomains"),
    ]
    assert by_check["dmarc reports"] == [(INFO, "aggregate reports go to mailto:dmarc@good.test")]
    [(status, text)] = by_check["mta-sts"]
    assert status == INFO and text.startswith("policy published (id=20240101T000000)")
    # Each MX was probed on mx_port, greeted as [gateway] hostname.
    for name in ("mx1", "mx2"):
        sink = world["sinks"][name]
        assert sink.commands_of(sink.connections - 1)[0] == b"EHLO gw.example.test"


def test_null_mx(world, capsys):
    before = sum(sink.connections for sink in world["sinks"].values())
    code, by_check, parsed = run_diagnose(capsys, world, "null.test")
    assert code == 1
    assert by_check["mx"] == [(FAIL, "null MX (0 .): null.test does not accept mail (RFC 7505)")]
    assert bad(parsed) == [parsed[0]]  # SPF and DMARC are fine for a domain without mail
    assert [c for _, c, _ in parsed][1:4] == ["spf", "spf syntax", "spf lookups"]
    assert sum(sink.connections for sink in world["sinks"].values()) == before


def test_missing_dmarc(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "nodmarc.test")
    assert code == 1
    assert bad(parsed) == [(WARN, "dmarc", "no DMARC record at _dmarc.nodmarc.test: receivers"
                            " have no policy for mail that fails SPF and DKIM, and you get no"
                            " reports")]


def test_spf_too_many_lookups(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "manyspf.test")
    assert code == 1
    [(status, text)] = by_check["spf lookups"]
    assert status == FAIL
    assert text.startswith("12 DNS-querying terms")
    assert "over the limit of 10" in text
    assert [check for _, check, _ in bad(parsed)] == ["spf lookups"]


def test_bad_dkim_record(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "baddkim.test", "--selector", "sel")
    assert code == 1
    assert bad(parsed) == [(FAIL, "dkim sel", "p= is not a usable rsa public key: not a DER"
                            " public key")]


def test_dkim_selector_missing(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "good.test", "--selector", "nope")
    assert code == 1
    assert by_check["dkim nope"] == [(FAIL, "no TXT record at nope._domainkey.good.test: mail"
                                      " signed with selector nope fails DKIM")]


def test_bad_certificate_on_one_mx(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "badcert.test")
    assert code == 1
    problems = bad(parsed)
    assert [(s, c) for s, c, _ in problems] == [(FAIL, "mx.badcert.test[127.0.0.4] expiry")]
    assert "expired on" in problems[0][2]
    assert statuses(by_check, "mx1.good.test[127.0.0.2] expiry") == [OK]
    assert statuses(by_check, "mx.badcert.test[127.0.0.4] hostname") == [OK]


def test_mx_without_starttls(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "plain.test")
    assert code == 1
    [(status, check, text)] = bad(parsed)
    assert (status, check) == (FAIL, "mx.plain.test[127.0.0.5] starttls")
    assert "not offered" in text


def test_nxdomain(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "missing.test")
    assert code == 1
    assert parsed == [(FAIL, "mx", "missing.test does not exist in DNS (NXDOMAIN): nobody can"
                       " send mail to it")]


def test_servfail(world, capsys):
    code, by_check, parsed = run_diagnose(capsys, world, "servfail.test")
    assert code == 1
    assert parsed[0][:2] == (FAIL, "mx")
    assert "cannot look up the MX records of servfail.test" in parsed[0][2]


def test_dns_timeout_is_bounded(world, capsys, tmp_path):
    zone = world["zone"]
    zone.hang("slow.test")
    try:
        code, out, err = run(capsys, "diagnose", "slow.test", "--config", world["config"])
    finally:
        zone.restore("slow.test")
    assert (code, err) == (1, "")
    assert out.startswith("FAIL  mx: cannot look up the MX records of slow.test: timeout")


def test_bad_arguments(world, capsys):
    code, out, err = run(capsys, "diagnose", "not a domain", "--config", world["config"])
    assert (code, out) == (1, "")
    assert err == "mailgate: expected a domain like example.com, got 'not a domain'\n"
    code, out, err = run(capsys, "diagnose", "good.test", "--selector", "a b")
    assert (code, out) == (1, "")
    assert err == "mailgate: expected a selector like mail2024, got 'a b'\n"


def test_as_a_process(world):
    result = subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "diagnose", "good.test", "--selector", "sel",
         "--config", world["config"], "--timeout", "5"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert "OK    mx: 2 MX records: 10 mx1.good.test, 20 mx2.good.test\n" in result.stdout


# --- the DNS used ------------------------------------------------------------------------------


def test_config_nameservers_only(world, monkeypatch):
    zone = world["zone"]
    lookups = diagnose.Lookups.from_config(DNSConfig(nameservers=(zone.address,), timeout=1.0))
    assert [str(ns.address) for ns in lookups.resolver.nameservers] == ["127.0.0.1"]
    assert [ns.port for ns in lookups.resolver.nameservers] == [zone.port]
    before = zone.count("good.test", "MX")
    assert len(lookups.query("good.test", "MX").records) == 2
    assert zone.count("good.test", "MX") == before + 1


def test_the_guard_is_on_here_too():
    with pytest.raises(AssertionError):
        diagnose.Lookups.from_config(None)


def test_system_resolver_without_nameservers(monkeypatch):
    """Without [dns] nameservers (or --config), dnspython's system resolver; not queried here."""
    used = []

    def read_resolv_conf(self, *args, **kwargs):
        used.append(True)
        self.nameservers = ["127.0.0.1"]

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", read_resolv_conf)
    diagnose.Lookups.from_config(None)
    diagnose.Lookups.from_config(DNSConfig())
    assert used == [True, True]
    diagnose.Lookups.from_config(DNSConfig(nameservers=(("127.0.0.1", 5353),)))
    assert used == [True, True]


# --- checks one by one, with the real DNS server and a stand-in for the SMTP probe -------------


@pytest.fixture
def zone(world):
    """A fresh zone of its own (the module's one is shared), served in a thread."""
    zone = TestDNS()
    zone.start_thread()
    yield zone
    zone.stop_thread()


def lookups_for(zone):
    return diagnose.Lookups.from_config(DNSConfig(nameservers=(zone.address,), timeout=1.0))


def probe_stub(calls):
    def probe(address, port, servername, cafile, implicit, timeout, ehlo_name):
        calls.append((address, port, servername))
        return [Finding(OK, "banner", "220 stub")]

    return probe


def test_no_mx_implicit(zone):
    zone.add("nomx.test", "A", "127.0.0.9")
    zone.add("nomx.test", "AAAA", "::1")
    calls = []
    result = diagnose.diagnose("nomx.test", lookups_for(zone), mx_port=2525,
                               probe=probe_stub(calls))
    assert result[0] == Finding(WARN, "mx", "no MX records: senders fall back to the address of"
                                " nomx.test itself (implicit MX); publish an MX record")
    assert result[1] == Finding(OK, "nomx.test addresses", "127.0.0.9, ::1")
    assert calls == [("127.0.0.9", 2525, "nomx.test"), ("::1", 2525, "nomx.test")]
    assert Finding(OK, "nomx.test[::1] banner", "220 stub") in result


def test_mx_problems(zone):
    zone.add("mixed.test", "MX", (0, "."))
    zone.add("mixed.test", "MX", (10, "mx.mixed.test"))
    zone.add("mx.mixed.test", "CNAME", "real.mixed.test")
    zone.add("real.mixed.test", "A", "127.0.0.9")
    zone.add("noaddr.test", "MX", (10, "gone.noaddr.test"))
    calls = []
    result = diagnose.diagnose("mixed.test", lookups_for(zone), probe=probe_stub(calls))
    assert result[0].status == FAIL and "null MX" in result[0].text
    assert Finding(WARN, "mx.mixed.test addresses", "mx.mixed.test is an alias (CNAME) of"
                   " real.mixed.test: an MX must name the host itself (RFC 2181 10.3)") in result
    assert calls == [("127.0.0.9", 25, "mx.mixed.test")]
    result = diagnose.diagnose("noaddr.test", lookups_for(zone), probe=probe_stub(calls))
    assert Finding(FAIL, "gone.noaddr.test addresses", "gone.noaddr.test has no A or AAAA"
                   " records: senders cannot reach this MX") in result


def spf_findings(zone, record, extra=()):
    zone.add("spf.test", "TXT", record)
    for name, text in extra:
        zone.add(name, "TXT", text)
    return {f.check: (f.status, f.text) for f in diagnose.check_spf("spf.test", lookups_for(zone))
            if f.check != "spf policy"}, diagnose.check_spf("spf.test", lookups_for(zone))


@pytest.mark.parametrize("count, status", [(8, OK), (9, WARN), (10, WARN), (11, FAIL)])
def test_spf_limit(zone, count, status):
    record = "v=spf1 " + " ".join("a:h%d.spf.test" % i for i in range(count)) + " -all"
    by_check, _ = spf_findings(zone, record)
    assert by_check["spf lookups"][0] == status
    assert by_check["spf lookups"][1].startswith("%d DNS-querying terms (" % count)


def test_spf_redirect_counted(zone):
    by_check, _ = spf_findings(zone, "v=spf1 mx redirect=_r.spf.test",
                               [("_r.spf.test", "v=spf1 a ptr exists:x.spf.test -all")])
    assert by_check["spf lookups"] == (OK, by_check["spf lookups"][1])
    assert by_check["spf lookups"][1].startswith("5 DNS-querying terms")


@pytest.mark.parametrize("record, words", [
    ("v=spf1 foo -all", "unknown term 'foo'"),
    ("v=spf1 ip4:300.1.1.1 -all", "not an IP address"),
    ("v=spf1 ip4:2001:db8::1 -all", "not an IPv4 address"),
    ("v=spf1 include -all", "include needs a domain"),
    ("v=spf1 all:x", "all takes no argument"),
    ("v=spf1 a/33 -all", "bad prefix length"),
    ("v=spf1 redirect=a.test redirect=b.test", "redirect= appears twice"),
    ("v=spf1 include:%{z}.test -all", "bad macro"),
    ("v=spf1 include:localhost -all", "not a fully qualified domain name"),
])
def test_spf_syntax_errors(zone, record, words):
    by_check, _ = spf_findings(zone, record)
    status, text = by_check["spf syntax"]
    assert status == FAIL and words in text


def test_spf_valid_terms():
    terms = diagnose.parse_spf(
        "v=spf1 +a -mx:m.test/24 ~ptr ?exists:%{i}.e.test ip4:192.0.2.1 ip6:2001:db8::/32"
        " a:x.test/24//64 include:_s.test exp=explain.test unknown=whatever -all")
    assert [t.kind for t in terms] == [
        "a", "mx", "ptr", "exists", "ip4", "ip6", "a", "include", "exp", "unknown", "all"]
    assert [t.qualifier for t in terms][:4] == ["+", "-", "~", "?"]


def test_spf_none_and_several(zone):
    assert diagnose.check_spf("empty.test", lookups_for(zone))[0].status == WARN
    zone.add("two.test", "TXT", "v=spf1 -all")
    zone.add("two.test", "TXT", "v=spf1 mx -all")
    [finding] = diagnose.check_spf("two.test", lookups_for(zone))
    assert finding.status == FAIL and "2 SPF records" in finding.text


def test_spf_include_problems(zone):
    by_check, result = spf_findings(zone, "v=spf1 include:loop.spf.test include:none.spf.test"
                                    " include:%{d}.m.spf.test +all",
                                    [("loop.spf.test", "v=spf1 include:spf.test -all"),
                                     ("none.spf.test", "just text")])
    problems = [(f.status, f.text) for f in result if f.check == "spf includes"]
    assert (FAIL, "include:spf.test (in loop.spf.test) loops back to spf.test: a permanent"
            " error") in problems
    assert (FAIL, "include:none.spf.test (in spf.test): no SPF record there, a permanent error"
            " for receivers") in problems
    assert any(s == INFO and "uses macros" in t for s, t in problems)
    assert (WARN, "+all lets every server on the internet send as this domain: use -all or"
            " ~all") in [(f.status, f.text) for f in result if f.check == "spf policy"]


def dkim(zone, record, selector="s1"):
    if record is not None:
        for text in record if isinstance(record, list) else [record]:
            zone.add("%s._domainkey.dkim.test" % selector, "TXT", text)
    return [(f.status, f.text) for f in diagnose.check_dkim("dkim.test", selector,
                                                            lookups_for(zone))]


def test_dkim_ed25519(zone):
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert dkim(zone, "v=DKIM1; k=ed25519; p=" + _b64(key)) == [
        (OK, "s1._domainkey.dkim.test: ed25519 key")]


def test_dkim_pkcs1_rsa_and_testing_flag(zone):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pkcs1 = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert dkim(zone, "v=DKIM1; t=y; p=" + _b64(pkcs1)) == [
        (WARN, "s1._domainkey.dkim.test: rsa 1024-bit key: weak; use 2048 bits (RFC 8301)"),
        (INFO, "t=y: the domain is testing DKIM; verifiers may ignore failures"),
    ]


@pytest.mark.parametrize("record, words", [
    ("v=DKIM1; k=rsa; p=", "p= is empty: the key was revoked"),
    ("v=DKIM1; k=rsa", "no p= tag"),
    ("v=DKIM1; k=dsa; p=AAAA", "k=dsa: unknown key type"),
    ("k=rsa; v=DKIM1; p=AAAA", "v=DKIM1 not first"),
    ("v=DKIM2; p=AAAA", "v=DKIM2"),
    ("v=DKIM1; p=!!notbase64!!", "not valid base64"),
    ("v=DKIM1; k=ed25519; p=AAAA", "an ed25519 key is 32 bytes"),
    ("v=DKIM1; p=a; p=b", "appears twice"),
    ("just some text", "not a DKIM key record"),
    (["v=DKIM1; p=AAAA", "v=DKIM1; p=BBBB"], "2 TXT records"),
    (None, "no TXT record at s1._domainkey.dkim.test"),
])
def test_dkim_bad(zone, record, words):
    result = dkim(zone, record)
    assert result[-1][0] == FAIL and words in result[-1][1], result


def test_dkim_rsa_key_in_pieces(world, zone):
    """A long p= split over several TXT strings (and with spaces) is one key."""
    p = world["rsa_p"]
    assert dkim(zone, "v=DKIM1; k=rsa; p=%s %s" % (p[:100], p[100:])) == [
        (OK, "s1._domainkey.dkim.test: rsa 2048-bit key")]


def dmarc(zone, domain, *records):
    for name, text in records:
        zone.add(name, "TXT", text)
    return [(f.status, f.check, f.text) for f in diagnose.check_dmarc(domain, lookups_for(zone))]


def test_dmarc_none_policy_and_no_reports(zone):
    assert dmarc(zone, "d.test", ("_dmarc.d.test", "v=DMARC1; p=none")) == [
        (OK, "dmarc", "one DMARC record at _dmarc.d.test: v=DMARC1; p=none"),
        (WARN, "dmarc policy", "p=none: monitoring only, receivers deliver forged mail as usual;"
         " move to quarantine or reject once the reports look clean"),
        (INFO, "dmarc reports", "no rua=: you receive no aggregate reports (add"
         " rua=mailto:dmarc-reports@your-domain)"),
    ]


@pytest.mark.parametrize("records, words", [
    ([("_dmarc.d.test", "v=DMARC1; p=reject"), ("_dmarc.d.test", "v=DMARC1; p=none")],
     "2 DMARC records"),
    ([("_dmarc.d.test", "v=DMARC1; p=maybe")], "p=maybe at _dmarc.d.test: must be none"),
    ([("_dmarc.d.test", "v=DMARC1; rua=mailto:a@d.test")], "no p= tag"),
    ([("_dmarc.d.test", "v=DMARC1; p=reject; p=none")], "appears twice"),
])
def test_dmarc_bad(zone, records, words):
    result = dmarc(zone, "d.test", *records)
    assert result[-1][0] == FAIL and words in result[-1][2], result


def test_dmarc_inherited_from_organizational_domain(zone):
    result = dmarc(zone, "sub.org.test", ("_dmarc.org.test", "v=DMARC1; p=none; sp=reject"))
    assert result[0] == (OK, "dmarc", "one DMARC record at _dmarc.org.test: v=DMARC1; p=none;"
                         " sp=reject")
    assert result[1] == (INFO, "dmarc", "no record at _dmarc.sub.org.test: the organizational"
                         " domain's record at _dmarc.org.test applies (its sp=, else p=)")
    assert result[2] == (OK, "dmarc policy", "sp=reject: receivers reject mail that fails DMARC")


def test_dmarc_bad_report_address(zone):
    result = dmarc(zone, "d.test", ("_dmarc.d.test", "v=DMARC1; p=reject; rua=https://x.test"))
    assert result[-1] == (WARN, "dmarc reports", "rua=https://x.test: receivers only send"
                          " reports to mailto: addresses")


def test_mta_sts(zone):
    lookups = lookups_for(zone)
    assert diagnose.check_mta_sts("a.test", lookups) == [
        Finding(INFO, "mta-sts", "no MTA-STS policy (no v=STSv1 TXT record at _mta-sts.a.test)")]
    zone.add("_mta-sts.b.test", "TXT", "v=STSv1; id=")
    [finding] = diagnose.check_mta_sts("b.test", lookups)
    assert finding.status == WARN and "needs id=" in finding.text
    zone.add("_mta-sts.c.test", "TXT", "v=STSv1; id=abc123")
    [finding] = diagnose.check_mta_sts("c.test", lookups)
    assert finding.status == INFO and finding.text.startswith("policy published (id=abc123)")
