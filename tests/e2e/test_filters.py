"""
End to end: the real gateway (twistd) running its filters (SPF, DKIM, DMARC, attachments, a
third-party filter loaded by dotted path, and one that fails), with every DNS question answered by
one loopback test DNS server (tests/dnsserver.py, thread mode) holding the zones of
tests/e2e/filterzones.py.  No gateway here ever asks the system resolver: each configuration
names that server in [dns] nameservers.

Three gateways, each started once (module fixtures) and shared by the tests that need it:

* default: the usual relay / submission / smtps listeners (harness.base_config), every filter
  option at its default (results recorded only), plus a listener running
  tests.thirdparty_filter.SubjectTagger and one running tests.e2e.brokenfilter.Raiser;
* strict: [spf] reject_fail, tempfail_on_error, reject_permerror; [dmarc] enforce = yes;
  [attachments] action = quarantine;
* tag: [dmarc] enforce = yes with quarantine_action = tag.

All share one harness.Holding (its test DNS server and its sink answering 451), so that accepted
mail stays queued (active/ or deferred/) where the tests read it; quarantined mail is read from
quarantine/.  [dns] timeout is 1s, so that a name the DNS server never answers gives an SPF
temperror in about a second.
"""

import collections
import os
import re

import dkim
import pytest

from mailgate.smtp.auth import set_user
from tests import attachment_corpus as corpus
from tests.e2e import brokenfilter
from tests.e2e import filterzones as z
from tests.e2e import harness as h
from tests.tlsutil import make_ca

ALICE = ("alice@example.com", "alice-secret-1")
RELAY_IP = "127.0.0.2"  # in every relay listener's relay_ips: SPF and DMARC skip it
TAGGER = "tests.thirdparty_filter.SubjectTagger"
RAISER = "tests.e2e.brokenfilter.Raiser"
NO_SPF_SENDER = "sender@spf-none.test"  # MAIL FROM for tests about something else than SPF
TEMP_FAIL = (451, "4.3.0 Temporary failure, please try again later")


# --- the gateways --------------------------------------------------------------------------------


class Env:
    """One running gateway: gw (harness.Gateway), spool, and the shared keys, zone and CA."""

    def __init__(self, gw, shared):
        self.gw = gw
        self.spool = gw.path("spool")
        self.shared = shared

    def port(self, listener="relay"):
        return self.gw.ports[listener]


class Shared:
    pass


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The DKIM keys, the Holding (test DNS with every zone, sink) and a CA for the whole module."""
    root = str(tmp_path_factory.mktemp("filters"))
    s = Shared()
    s.root = root
    s.keys = z.Keys()
    s.ca = make_ca(os.path.join(root, "ca"))
    s.holding = h.Holding()
    z.publish(s.holding.dns, s.keys)
    s.holding.start()
    try:
        yield s
        assert s.holding.sink.messages == []  # held: nothing was delivered
    finally:
        s.holding.stop()


def _dns_sections(shared):
    sections = shared.holding.sections()
    sections["dns"]["timeout"] = "1s"
    return sections


def _run(shared, name, config, traceback_ok=None):
    """Start a gateway on config, yield its Env; stop it and check its output afterwards."""
    gw = h.Gateway(os.path.join(shared.root, name))
    try:
        gw.start(config)
        yield Env(gw, shared)
        gw.stop()
        assert gw.stopped_cleanly(), gw.describe()
        check_tracebacks(gw.all_output(), traceback_ok)
    finally:
        gw.cleanup()


def check_tracebacks(output, allowed=None):
    """No traceback in output but those whose exception line matches the regex allowed."""
    for block in output.split("Traceback (most recent call last):")[1:]:
        # The block runs until the next log line (which starts with a timestamp); its last
        # non-empty line is the exception, e.g. "tests.e2e.brokenfilter.DeliberateError: ...".
        lines = []
        for line in block.splitlines()[1:]:
            if re.match(r"\d{4}-\d\d-\d\dT", line):
                break
            if line.strip():
                lines.append(line.strip())
        last = lines[-1] if lines else ""
        if allowed is None or not re.search(allowed, last):
            raise AssertionError("unexpected traceback in the gateway's output:\n%s" % block[:3000])


def relay_listener(**extra):
    listener = {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay", "tls": "none",
                "auth": "none", "relay_ips": RELAY_IP + "/32"}
    listener.update(extra)
    return listener


def small_config(shared, **sections):
    config = {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com",
                    "max_message_size": "1M"},
        "queue": {"path": "spool"},
        "listener:relay": relay_listener(),
    }
    config.update(_dns_sections(shared))
    config.update(sections)
    return config


@pytest.fixture(scope="module")
def default(shared):
    directory = os.path.join(shared.root, "default")
    cert, key = h.issue_server_cert(shared.ca, os.path.join(directory, "tls"))
    users = os.path.join(directory, "users")
    set_user(users, ALICE[0], ALICE[1])
    config = h.base_config(directory, cert, key, users, shared.holding)
    config.update(_dns_sections(shared))
    config["listener:tagger"] = relay_listener(filters=TAGGER)
    config["filter:" + TAGGER] = {"tag": "[EXTERNAL]", "header": "X-Tagged"}
    config["listener:broken"] = relay_listener(filters=RAISER)
    config["filter:" + RAISER] = {"trigger": "boom"}
    # Only the broken filter's failures may leave a traceback (logged with the 451 4.3.0).
    yield from _run(shared, "default", config,
                    traceback_ok=r"DeliberateError: %s|FilterError: filter raiser answered"
                    % re.escape(brokenfilter.MESSAGE))


@pytest.fixture(scope="module")
def strict(shared):
    config = small_config(
        shared,
        spf={"reject_fail": "yes", "tempfail_on_error": "yes", "reject_permerror": "yes"},
        dmarc={"enforce": "yes"},
        attachments={"action": "quarantine"},
    )
    yield from _run(shared, "strict", config)


@pytest.fixture(scope="module")
def tag(shared):
    config = small_config(shared, dmarc={"enforce": "yes", "quarantine_action": "tag"})
    yield from _run(shared, "tag", config)


# --- sending and reading back ---------------------------------------------------------------------


class Outcome(collections.namedtuple("Outcome", "stage code text")):
    """Where a transaction ended ("mail", "rcpt", "data") and the reply there, text as str."""

    @property
    def queue_id(self):
        return h.queue_id_of(self.code, self.text.encode())

    @property
    def reply(self):
        return self.code, self.text


def transact(client, sender, message, recipients=("user@example.com",)):
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender)
    if code != 250:
        return Outcome("mail", code, text.decode())
    for rcpt in recipients:
        code, text = client.rcpt(rcpt)
        if code != 250:
            return Outcome("rcpt", code, text.decode())
    code, text = client.data(message)
    return Outcome("data", code, text.decode())


def send(env, sender, message, listener="relay", source=None, recipients=("user@example.com",)):
    """One message in a session of its own: its Outcome."""
    client = h.smtp(env.port(listener), source=source)
    try:
        return transact(client, sender, message, recipients)
    finally:
        h.close(client)


def accepted(env, sender, message, **kw):
    """Send; it must be accepted.  The queue id."""
    outcome = send(env, sender, message, **kw)
    assert outcome.stage == "data" and outcome.code == 250, outcome
    return outcome.queue_id


def stored(env, queue_id):
    """The entry of a message waiting for delivery (active/ or deferred/), never quarantined."""
    assert not os.path.exists(os.path.join(env.spool, "quarantine", queue_id))
    return h.spool_entry(env.spool, queue_id)


def quarantined(env, queue_id):
    """The entry of a quarantined message (and it is not waiting for delivery)."""
    assert queue_id not in h.queued_ids(env.spool), h.spool_listing(env.spool)
    return h.spool_entry(env.spool, queue_id, "quarantine")


def ours(entry):
    """The one Authentication-Results field of the entry that names our hostname."""
    fields = [f for f in z.auth_results(entry.message()) if f.authserv_id == h.HOSTNAME]
    assert len(fields) == 1, entry.body[:1500]
    return fields[0]


def verdicts(entry):
    return [tuple(v) for v in entry.envelope.get("verdicts", [])]


def not_queued(env, before):
    """Nothing new anywhere in the spool (active, deferred, quarantine) since before."""
    return all_ids(env) == before


def all_ids(env):
    listing = h.spool_listing(env.spool)
    return {name for state in ("active", "deferred", "quarantine") for name in listing.get(state, [])}


def message_from(domain, subject, local="someone", **kw):
    return h.make_message(subject, sender="%s@%s" % (local, domain), **kw)


# --- 1. SPF ----------------------------------------------------------------------------------------

SPF_CASES = [
    ("spf-pass.test", "pass"),
    ("spf-fail.test", "fail"),
    ("spf-softfail.test", "softfail"),
    ("spf-neutral.test", "neutral"),
    ("spf-none.test", "none"),
    ("spf-permerror.test", "permerror"),
    (z.SPF_HANG, "temperror"),
]


@pytest.mark.parametrize("domain,result", SPF_CASES, ids=[r for _, r in SPF_CASES])
def test_spf_result_recorded(default, domain, result):
    sender = "sender@" + domain
    queue_id = accepted(default, sender, message_from(domain, "spf " + result))
    entry = stored(default, queue_id)
    spf = ours(entry).one("spf")
    assert (spf["result"], spf["props"]) == (result, {"smtp.mailfrom": domain}), ours(entry)
    if result in ("temperror", "permerror"):
        assert spf["reason"], ours(entry)  # says why
    assert ("spf", "next") in verdicts(entry)
    # Our field is on top of the message, just under our Received.
    assert entry.message().keys()[:2] == ["Received", "Authentication-Results"]


def test_spf_authentication_results_format(default):
    queue_id = accepted(default, "sender@spf-pass.test", message_from("spf-pass.test", "format"))
    body = stored(default, queue_id).body
    field = re.search(rb"^Authentication-Results:.*?\r\n(?![ \t])", body, re.M | re.S).group(0)
    # RFC 8601 as README / mailgate.filters.authresults document it: authserv-id; then one result a line.
    assert field.startswith(b"Authentication-Results: mx.test.example;\r\n\tspf=pass "
                            b"smtp.mailfrom=spf-pass.test;\r\n\tdkim=none;\r\n\tdmarc=none "
                            b"header.from=spf-pass.test\r\n"), field


def test_spf_checks_the_client_address(default):
    """spf-dot5.test allows 127.0.0.5 only: pass from there, fail from 127.0.0.1."""
    message = message_from("spf-dot5.test", "spf from .5")
    entry = stored(default, accepted(default, "a@spf-dot5.test", message, source="127.0.0.5"))
    assert entry.envelope["client_ip"] == "127.0.0.5"
    assert ours(entry).one("spf")["result"] == "pass"
    entry = stored(default, accepted(default, "a@spf-dot5.test", message))
    assert ours(entry).one("spf")["result"] == "fail"


def test_spf_null_sender_checks_helo(default):
    queue_id = accepted(default, "", message_from("spf-none.test", "bounce"))
    spf = ours(stored(default, queue_id)).one("spf")
    assert (spf["result"], spf["props"]) == ("none", {"smtp.helo": h.CLIENT_HELO}), spf


def test_spf_and_dmarc_skip_relay_ips(default):
    message = message_from("dmarc-reject.test", "from a relay ip")
    entry = stored(default, accepted(default, "sender@spf-fail.test", message, source=RELAY_IP))
    results = ours(entry)
    assert results.of("spf") == [] and results.of("dmarc") == [], results
    assert results.one("dkim")["result"] == "none"


def test_spf_reject_fail(strict):
    before = all_ids(strict)
    outcome = send(strict, "sender@spf-fail.test", message_from("spf-fail.test", "x"))
    assert (outcome.stage, outcome.code, outcome.text[:6]) == ("mail", 550, "5.7.23"), outcome
    assert "spf-fail.test does not designate 127.0.0.1 as a permitted sender" in outcome.text
    assert not_queued(strict, before)


def test_spf_tempfail_on_error(strict):
    outcome = send(strict, "sender@" + z.SPF_HANG, message_from(z.SPF_HANG, "x"))
    assert (outcome.stage, outcome.code, outcome.text[:6]) == ("mail", 451, "4.7.24"), outcome
    assert z.SPF_HANG in outcome.text


def test_spf_reject_permerror(strict):
    outcome = send(strict, "sender@spf-permerror.test", message_from("spf-permerror.test", "x"))
    assert (outcome.stage, outcome.code, outcome.text[:6]) == ("mail", 550, "5.7.24"), outcome
    assert "spf-permerror.test" in outcome.text


@pytest.mark.parametrize("domain,result", [c for c in SPF_CASES if c[1] in
                                           ("pass", "softfail", "neutral", "none")],
                         ids=["pass", "softfail", "neutral", "none"])
def test_spf_strict_accepts_the_rest(strict, domain, result):
    entry = stored(strict, accepted(strict, "sender@" + domain, message_from(domain, result)))
    assert ours(entry).one("spf")["result"] == result


def test_spf_strict_skips_relay_ips(strict):
    message = message_from("spf-fail.test", "internal")
    entry = stored(strict, accepted(strict, "sender@spf-fail.test", message, source=RELAY_IP))
    assert ours(entry).of("spf") == []


# --- 2. DKIM ---------------------------------------------------------------------------------------


def dkim_message(keys, subject, key="rsa"):
    message = message_from(z.DKIM_DOMAIN, subject, body="Signed body.\r\nSecond line.\r\n")
    if key == "rsa":
        return z.sign(message, keys.rsa, z.SELECTOR_RSA, z.DKIM_DOMAIN)
    return z.sign(message, keys.ed25519, z.SELECTOR_ED, z.DKIM_DOMAIN)


def b_tag(signed, index=0):
    """The first 8 characters of b= of the index-th DKIM-Signature of signed."""
    values = re.findall(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.M | re.S)
    value = re.sub(rb"\s+", b"", values[index])
    return re.search(rb";b=([^;]*)", value).group(1)[:8].decode()


def verifies(shared, body):
    """The stored message still verifies with dkimpy (keys from the test DNS by dnspython)."""
    resolver = shared.holding.dns.dnspython_resolver()

    def dnsfunc(name, timeout=5):
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(answer[0].strings)

    return dkim.verify(body, dnsfunc=dnsfunc)


@pytest.mark.parametrize("key,selector,algorithm", [("rsa", z.SELECTOR_RSA, "rsa-sha256"),
                                                    ("ed25519", z.SELECTOR_ED, "ed25519-sha256")],
                         ids=["rsa2048", "ed25519"])
def test_dkim_pass(default, key, selector, algorithm):
    signed = dkim_message(default.shared.keys, "dkim " + key, key)
    entry = stored(default, accepted(default, NO_SPF_SENDER, signed))
    results = ours(entry)
    result = results.one("dkim")
    assert result["result"] == "pass", results
    # dkimpy signs with i=@domain by default; "@" is a tspecial, so the value is quoted
    assert result["props"] == {"header.d": z.DKIM_DOMAIN, "header.i": "@" + z.DKIM_DOMAIN,
                               "header.s": selector, "header.a": algorithm,
                               "header.b": b_tag(signed)}, results
    assert 'header.i="@%s"' % z.DKIM_DOMAIN in results.raw
    # dkim.test publishes p=reject: an aligned DKIM pass makes DMARC pass
    dmarc = results.one("dmarc")
    assert (dmarc["result"], dmarc["props"]) == (
        "pass", {"header.from": z.DKIM_DOMAIN, "policy.dmarc": "reject"}), results
    assert entry.body.endswith(signed)  # signed part untouched
    assert verifies(default.shared, entry.body)


def test_dkim_body_tampered(default):
    signed = dkim_message(default.shared.keys, "dkim tampered")
    tampered = signed.replace(b"Second line.", b"Second line!")
    entry = stored(default, accepted(default, NO_SPF_SENDER, tampered))
    results = ours(entry)
    result = results.one("dkim")
    assert (result["result"], result["reason"]) == ("fail", "body hash mismatch"), results
    assert result["props"]["header.d"] == z.DKIM_DOMAIN
    dmarc = results.one("dmarc")
    assert (dmarc["result"], dmarc["props"]["policy.dmarc"]) == ("fail", "reject"), results


def test_dkim_missing_key(default):
    message = message_from(z.DKIM_DOMAIN, "dkim no key")
    signed = z.sign(message, default.shared.keys.rsa, z.SELECTOR_MISSING, z.DKIM_DOMAIN)
    results = ours(stored(default, accepted(default, NO_SPF_SENDER, signed)))
    result = results.one("dkim")
    assert result["result"] == "permerror", results
    assert result["reason"], results
    assert (result["props"]["header.d"], result["props"]["header.s"]) == (
        z.DKIM_DOMAIN, z.SELECTOR_MISSING)


def test_dkim_two_signatures(default):
    keys = default.shared.keys
    signed = z.sign(dkim_message(keys, "dkim twice"), keys.ed25519, z.SELECTOR_ED, z.DKIM_DOMAIN)
    results = ours(stored(default, accepted(default, NO_SPF_SENDER, signed)))
    found = [(r["result"], r["props"]["header.s"], r["props"]["header.b"]) for r in results.of("dkim")]
    # in header order: the ed25519 signature was added last, so it is on top
    assert found == [("pass", z.SELECTOR_ED, b_tag(signed, 0)),
                     ("pass", z.SELECTOR_RSA, b_tag(signed, 1))], results


def test_dkim_unsigned_is_none(default):
    results = ours(stored(default, accepted(default, NO_SPF_SENDER,
                                            message_from("example.org", "unsigned"))))
    assert results.one("dkim") == {"method": "dkim", "result": "none", "reason": None,
                                   "props": {}}


def test_dkim_decides_dmarc_under_enforcement(strict):
    """p=reject From domain: a valid signature gets through, a broken one is refused."""
    keys = strict.shared.keys
    entry = stored(strict, accepted(strict, NO_SPF_SENDER, dkim_message(keys, "enforced ok")))
    assert ours(entry).one("dmarc")["result"] == "pass"
    tampered = dkim_message(keys, "enforced bad").replace(b"Signed body.", b"Signed b0dy.")
    outcome = send(strict, NO_SPF_SENDER, tampered)
    assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome


# --- 3. DMARC --------------------------------------------------------------------------------------

# (From domain, MAIL FROM, signature domain or None) -> recorded (result, policy)
DMARC_CASES = {
    "reject": ("dmarc-reject.test", NO_SPF_SENDER, None, "fail", "reject"),
    "quarantine": ("dmarc-quarantine.test", NO_SPF_SENDER, None, "fail", "quarantine"),
    "none": ("dmarc-none.test", NO_SPF_SENDER, None, "fail", "none"),
    "sp-subdomain": ("sub.dmarc-sp.test", NO_SPF_SENDER, None, "fail", "reject"),
    "sp-org-domain": ("dmarc-sp.test", NO_SPF_SENDER, None, "fail", "none"),
    "pct0": ("dmarc-pct0.test", NO_SPF_SENDER, None, "fail", "reject"),
    "adkim-strict": ("dmarc-strict.test", NO_SPF_SENDER, "mail.dmarc-strict.test", "fail", "reject"),
    "adkim-relaxed": ("dmarc-relaxed.test", NO_SPF_SENDER, "mail.dmarc-relaxed.test", "pass",
                      "reject"),
    "aspf-strict": ("dmarc-aspf-strict.test", "b@bounce.dmarc-aspf-strict.test", None, "fail",
                    "reject"),
    "aspf-relaxed": ("dmarc-aspf-relaxed.test", "b@bounce.dmarc-aspf-relaxed.test", None, "pass",
                     "reject"),
    "no-record": ("example.org", NO_SPF_SENDER, None, "none", None),
}


def dmarc_message(keys, case):
    from_domain, _, signer, _, _ = DMARC_CASES[case]
    message = message_from(from_domain, "dmarc " + case)
    if signer is not None:
        message = z.sign(message, keys.rsa, z.SELECTOR_RSA, signer)
    return message


@pytest.mark.parametrize("case", list(DMARC_CASES))
def test_dmarc_recorded(default, case):
    from_domain, sender, signer, result, policy = DMARC_CASES[case]
    entry = stored(default, accepted(default, sender, dmarc_message(default.shared.keys, case)))
    results = ours(entry)
    dmarc = results.one("dmarc")
    props = {"header.from": from_domain}
    if policy is not None:
        props["policy.dmarc"] = policy
    assert (dmarc["result"], dmarc["props"]) == (result, props), results
    if case == "pct0":
        assert dmarc["reason"] == "pct=0: quarantine applied", results
    if signer is not None:  # the signature itself is good; alignment is what differs
        assert results.one("dkim")["result"] == "pass"
        assert results.one("dkim")["props"]["header.d"] == signer
    if case.startswith("aspf"):
        assert results.one("spf")["result"] == "pass", results
    assert entry.message()["X-Mailgate-DMARC"] is None  # not enforced: not tagged
    assert ("dmarc", "next") in verdicts(entry)


# What enforce = yes does to each case: "reject" (550 5.7.1 at end of data), "quarantine"
# (250, quarantine/) or "deliver" (250, active/ or deferred/).
ENFORCED = {
    "reject": "reject",
    "quarantine": "quarantine",
    "none": "deliver",
    "sp-subdomain": "reject",
    "sp-org-domain": "deliver",
    "pct0": "quarantine",  # outside the 0 % sample: the next milder policy
    "adkim-strict": "reject",
    "adkim-relaxed": "deliver",
    "aspf-strict": "reject",
    "aspf-relaxed": "deliver",
    "no-record": "deliver",
}


@pytest.mark.parametrize("case", list(ENFORCED))
def test_dmarc_enforced(strict, case):
    from_domain, sender, _, _, _ = DMARC_CASES[case]
    before = all_ids(strict)
    outcome = send(strict, sender, dmarc_message(strict.shared.keys, case))
    expected = ENFORCED[case]
    if expected == "reject":
        assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome
        assert from_domain in outcome.text and "DMARC" in outcome.text, outcome
        assert not_queued(strict, before)
        return
    assert (outcome.stage, outcome.code) == ("data", 250), outcome
    if expected == "quarantine":
        entry = quarantined(strict, outcome.queue_id)
        assert ("dmarc", "quarantine") in verdicts(entry)
        assert ours(entry).one("dmarc")["result"] == "fail"
    else:
        entry = stored(strict, outcome.queue_id)
        assert ("dmarc", "next") in verdicts(entry)
    assert entry.message()["X-Mailgate-DMARC"] is None


def test_dmarc_quarantine_action_tag(tag):
    outcome = send(tag, NO_SPF_SENDER, dmarc_message(tag.shared.keys, "quarantine"))
    assert (outcome.stage, outcome.code) == ("data", 250), outcome
    entry = stored(tag, outcome.queue_id)  # delivered path, not quarantine/
    message = entry.message()
    assert message.get_all("X-Mailgate-DMARC") == ["fail policy=quarantine"]
    assert ours(entry).one("dmarc")["result"] == "fail"
    assert os.listdir(os.path.join(tag.spool, "quarantine")) == []


def test_dmarc_tag_gateway_still_rejects_and_passes(tag):
    outcome = send(tag, NO_SPF_SENDER, dmarc_message(tag.shared.keys, "reject"))
    assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome
    entry = stored(tag, accepted(tag, NO_SPF_SENDER, dmarc_message(tag.shared.keys, "adkim-relaxed")))
    assert entry.message()["X-Mailgate-DMARC"] is None


# --- 4. forged Authentication-Results ---------------------------------------------------------------

FORGED = [
    "Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=forged.test",
    "Authentication-Results: (looks legit) MX.Test.Example.;\r\n\tdkim=pass header.d=forged.test",
]
FOREIGN = "Authentication-Results: upstream.example.net;\r\n\tspf=pass smtp.mailfrom=upstream.test"


@pytest.mark.parametrize("listener", ["relay", "tagger"])
def test_forged_authentication_results_removed(default, listener):
    message = message_from("spf-fail.test", "forged a-r", extra_headers=FORGED + [FOREIGN])
    entry = stored(default, accepted(default, "sender@spf-fail.test", message, listener=listener))
    assert b"forged.test" not in entry.body, entry.body[:1500]
    fields = z.auth_results(entry.message())
    foreign = [f for f in fields if f.authserv_id == "upstream.example.net"]
    assert len(foreign) == 1 and FOREIGN.encode() + b"\r\n" in entry.body  # kept byte for byte
    mine = [f for f in fields if f.authserv_id.lower().rstrip(".") == h.HOSTNAME]
    if listener == "relay":
        assert len(mine) == 1 and mine[0].one("spf")["result"] == "fail", fields
    else:  # no authenticating filter there: no field of ours at all, the forged ones still gone
        assert mine == [], fields
    assert len(fields) == len(mine) + 1


# --- 5. attachments --------------------------------------------------------------------------------


def test_exe_attachment_rejected(default):
    before = all_ids(default)
    message = corpus.message_with(corpus.pe(), "evil.exe")
    outcome = send(default, NO_SPF_SENDER, message)
    assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome
    assert outcome.text.startswith("5.7.1 Message rejected: attachment evil.exe is not allowed"), outcome
    assert not_queued(default, before)


def test_exe_inside_zip_rejected(default):
    archive = corpus.zip_of([("readme.txt", b"hello\n"), ("evil.exe", corpus.pe())])
    outcome = send(default, NO_SPF_SENDER, corpus.message_with(archive, "archive.zip"))
    assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome
    assert "attachment archive.zip: evil.exe is not allowed" in outcome.text, outcome


def test_clean_pdf_accepted(default):
    message = corpus.message_with(corpus.pdf(), "report.pdf", ctype="application/pdf")
    entry = stored(default, accepted(default, NO_SPF_SENDER, message))
    assert entry.body.endswith(message)
    assert ("attachments", "next") in verdicts(entry)


def submission_client(env):
    client = h.smtp(env.port("submission"))
    try:
        client.starttls(context=h.client_context(env.shared.ca.ca_path))
        assert client.login(*ALICE) == (235, b"2.7.0 Authentication successful")
    except BaseException:
        h.close(client)
        raise
    return client


def test_exe_rejected_on_submission(default):
    client = submission_client(default)
    try:
        outcome = transact(client, ALICE[0], corpus.message_with(corpus.pe(), "evil.exe"),
                           recipients=("friend@elsewhere.test",))
        assert (outcome.stage, outcome.code, outcome.text[:5]) == ("data", 550, "5.7.1"), outcome
        assert "attachment evil.exe is not allowed" in outcome.text
        # The session goes on: a clean message is accepted.
        message = corpus.message_with(corpus.pdf(), "report.pdf", ctype="application/pdf")
        outcome = transact(client, ALICE[0], message, recipients=("friend@elsewhere.test",))
        assert outcome.code == 250, outcome
    finally:
        h.close(client)
    entry = stored(default, outcome.queue_id)
    assert entry.envelope["user"] == ALICE[0] and entry.envelope["listener"] == "submission"
    assert verdicts(entry) == [("attachments", "next")]  # submission runs attachments only
    assert z.auth_results(entry.message()) == []  # no SPF/DKIM/DMARC there: no A-R field


def test_attachment_quarantined(strict):
    message = corpus.message_with(corpus.pe(), "evil.exe")
    outcome = send(strict, NO_SPF_SENDER, message)
    assert (outcome.stage, outcome.code) == ("data", 250), outcome
    entry = quarantined(strict, outcome.queue_id)
    assert ("attachments", "quarantine") in verdicts(entry)
    assert entry.body.endswith(message)


# --- 6. a third-party filter by dotted path ----------------------------------------------------------


def test_thirdparty_filter_tags_subject(default):
    entry = stored(default, accepted(default, NO_SPF_SENDER, message_from("example.org", "hello"),
                                     listener="tagger"))
    message = entry.message()
    assert message.get_all("Subject") == ["[EXTERNAL] hello"]
    assert message.get_all("X-Tagged") == ["tagged"]
    assert verdicts(entry) == [("subject-tagger", "next")]
    assert entry.envelope["listener"] == "tagger"


def test_thirdparty_filter_leaves_relay_ips_alone(default):
    entry = stored(default, accepted(default, NO_SPF_SENDER, message_from("example.org", "internal"),
                                     listener="tagger", source=RELAY_IP))
    assert entry.message().get_all("Subject") == ["internal"]
    assert entry.message()["X-Tagged"] is None


# --- 7. a filter that raises --------------------------------------------------------------------------


def test_failing_filter_tempfails_and_gateway_goes_on(default):
    client = h.smtp(default.port("broken"))
    try:
        # on_data raises: 451 4.3.0, nothing queued
        before = all_ids(default)
        outcome = transact(client, NO_SPF_SENDER, message_from("example.org", "boom at data"))
        assert (outcome.stage,) + outcome.reply == ("data",) + TEMP_FAIL, outcome
        assert not_queued(default, before)
        # the same session goes on
        ok = transact(client, NO_SPF_SENDER, message_from("example.org", "fine after the failure"))
        assert ok.code == 250, ok
        # on_mail raises: 451 4.3.0 at MAIL; then MAIL again works
        outcome = transact(client, "boom@example.org", message_from("example.org", "x"))
        assert (outcome.stage,) + outcome.reply == ("mail",) + TEMP_FAIL, outcome
        # an answer that is not a Verdict is a failure too
        outcome = transact(client, NO_SPF_SENDER, message_from("example.org", "not-a-verdict"))
        assert (outcome.stage,) + outcome.reply == ("data",) + TEMP_FAIL, outcome
        again = transact(client, NO_SPF_SENDER, message_from("example.org", "fine again"))
        assert again.code == 250, again
    finally:
        h.close(client)
    assert default.gw.running
    entry = stored(default, ok.queue_id)
    assert entry.message()["Subject"] == "fine after the failure"
    assert verdicts(entry) == [("raiser", "next"), ("raiser", "next")]  # on_mail, on_data
    # logged with a traceback naming the filter
    output = default.gw.stdout
    assert "filter raiser failed at data in session" in output, default.gw.describe()
    assert "filter raiser failed at mail in session" in output, default.gw.describe()
    # a new session on another listener is served too
    entry = stored(default, accepted(default, "sender@spf-pass.test",
                                     message_from("spf-pass.test", "after the failures")))
    assert ours(entry).one("spf")["result"] == "pass"
