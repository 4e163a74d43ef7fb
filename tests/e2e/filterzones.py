"""
What the end-to-end filter tests (tests/e2e/test_filters.py) need besides the harness: the test
DNS zone (SPF, DKIM key and DMARC records, all under the reserved .test TLD), DKIM keys made here
and messages signed with dkimpy, and a reader for the Authentication-Results fields of a stored
message that does not use mailgate's own code.

Every record is published before any gateway starts: the gateway's resolver keeps negative
answers for a while, so a record added later might not be seen.
"""

import re

import dkim
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from tests.dkimkeys import key_record, private

# --- SPF -------------------------------------------------------------------------------------------

# domain -> its SPF record (None: no SPF record at all).  The test client connects from 127.0.0.1
# unless a test binds another loopback address.
SPF_RECORDS = {
    "spf-pass.test": "v=spf1 ip4:127.0.0.1 -all",
    "spf-fail.test": "v=spf1 ip4:192.0.2.1 -all",
    "spf-softfail.test": "v=spf1 ip4:192.0.2.1 ~all",
    "spf-neutral.test": "v=spf1 ?all",
    "spf-none.test": None,  # a TXT record that is not SPF, and an address
    "spf-permerror.test": "v=spf1 bogus-mechanism ip4:127.0.0.1 -all",  # a syntax error
    "spf-dot5.test": "v=spf1 ip4:127.0.0.5 -all",  # pass from 127.0.0.5 only
}
SPF_HANG = "spf-temperror.test"  # its TXT question is never answered: temperror at [dns] timeout

# --- DKIM ------------------------------------------------------------------------------------------

DKIM_DOMAIN = "dkim.test"
SELECTOR_RSA = "rsa"
SELECTOR_ED = "ed"
SELECTOR_MISSING = "nokey"  # never published

# --- DMARC -----------------------------------------------------------------------------------------

DMARC_RECORDS = {
    "dmarc-reject.test": "v=DMARC1; p=reject",
    "dmarc-quarantine.test": "v=DMARC1; p=quarantine",
    "dmarc-none.test": "v=DMARC1; p=none",
    # sp= for From domains below the organizational domain (found by the fallback lookup)
    "dmarc-sp.test": "v=DMARC1; p=none; sp=reject",
    "dmarc-pct0.test": "v=DMARC1; p=reject; pct=0",
    # signed with d=mail.<domain>: aligned only in relaxed mode
    "dmarc-strict.test": "v=DMARC1; p=reject; adkim=s",
    "dmarc-relaxed.test": "v=DMARC1; p=reject",
    # SPF alignment: MAIL FROM at bounce.<domain>, which passes SPF
    "dmarc-aspf-relaxed.test": "v=DMARC1; p=reject",
    "dmarc-aspf-strict.test": "v=DMARC1; p=reject; aspf=s",
    # the DKIM test domain is p=reject too: its passing signatures make DMARC pass
    DKIM_DOMAIN: "v=DMARC1; p=reject",
}
DMARC_SPF_PASS = ("bounce.dmarc-aspf-relaxed.test", "bounce.dmarc-aspf-strict.test")


class Keys:
    """One RSA 2048 and one Ed25519 key, made once (RSA generation takes a moment)."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed25519 = ed25519.Ed25519PrivateKey.generate()


def sign(message, key, selector, domain):
    """message (CRLF bytes) with a DKIM-Signature made by dkimpy in front."""
    algorithm = b"ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else b"rsa-sha256"
    header = dkim.sign(message, selector.encode(), domain.encode(), private(key),
                       signature_algorithm=algorithm, linesep=b"\r\n")
    return header + message


def publish(zone, keys):
    """Every record the filter tests need, in zone (a tests.dnsserver.TestDNS)."""
    for domain, record in SPF_RECORDS.items():
        zone.add(domain, "A", "192.0.2.10")
        zone.add(domain, "TXT", record if record is not None else "site-verification=abc123")
    zone.hang(SPF_HANG)
    for name in DMARC_SPF_PASS:
        zone.add(name, "TXT", "v=spf1 ip4:127.0.0.1 -all")
    for domain, record in DMARC_RECORDS.items():
        zone.add("_dmarc." + domain, "TXT", record)
    zone.add("%s._domainkey.%s" % (SELECTOR_RSA, DKIM_DOMAIN), "TXT", key_record(keys.rsa))
    zone.add("%s._domainkey.%s" % (SELECTOR_ED, DKIM_DOMAIN), "TXT", key_record(keys.ed25519))
    for domain in ("dmarc-strict.test", "dmarc-relaxed.test"):
        zone.add("%s._domainkey.mail.%s" % (SELECTOR_RSA, domain), "TXT", key_record(keys.rsa))
    return zone


# --- reading Authentication-Results ---------------------------------------------------------------

_PROPERTY = re.compile(r'([A-Za-z0-9_.-]+)=("(?:[^"\\]|\\.)*"|[^\s;"]+)')


def _split(text, sep=";"):
    """text split at sep outside quoted strings and comments."""
    parts, current, quoted, depth, escape = [], [], False, 0, False
    for ch in text:
        if escape:
            escape = False
        elif ch == "\\" and (quoted or depth):
            escape = True
        elif ch == '"' and not depth:
            quoted = not quoted
        elif ch == "(" and not quoted:
            depth += 1
        elif ch == ")" and not quoted and depth:
            depth -= 1
        elif ch == sep and not quoted and not depth:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _unquote(value):
    if value.startswith('"') and value.endswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


class AuthResults:
    """One Authentication-Results field: authserv_id and results, a list of dicts
    {"method", "result", "reason", "props": {ptype.property: value}}."""

    def __init__(self, value):
        self.raw = value
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
        parts = _split(unfolded)
        self.authserv_id = parts[0].strip()
        self.results = []
        for part in parts[1:]:
            part = part.strip()
            if not part or part == "none":
                continue
            head, _, rest = part.partition(" ")
            method, _, result = head.partition("=")
            props, reason = {}, None
            for name, value in _PROPERTY.findall(rest):
                if name == "reason":
                    reason = _unquote(value)
                else:
                    props[name] = _unquote(value)
            self.results.append({"method": method, "result": result, "reason": reason,
                                 "props": props})

    def of(self, method):
        return [r for r in self.results if r["method"] == method]

    def one(self, method):
        found = self.of(method)
        assert len(found) == 1, (method, self.raw)
        return found[0]

    def __repr__(self):
        return "<AuthResults %r>" % (self.raw,)


def auth_results(message):
    """Every Authentication-Results field of an email.message.Message (compat32), in order."""
    return [AuthResults(str(v)) for v in message.get_all("Authentication-Results") or []]
