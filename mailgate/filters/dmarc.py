"""
The DMARC filter (RFC 7489), our own implementation on top of the SPF and DKIM filters' results.

At end of data it takes the RFC5322.From domain (exactly one From header field with exactly one
address), finds the policy record (TXT at _dmarc.<From domain>, else at _dmarc.<organizational
domain>), and checks identifier alignment:

* SPF is aligned when session.transaction["spf"] says pass and its domain aligns with the From
  domain (relaxed, aspf=r: the same organizational domain; strict, aspf=s: equal).  With the null
  sender that domain is the HELO name, which RFC 7208 2.4 makes the MAIL FROM identity.
* DKIM is aligned when any signature in session.transaction["dkim"] passed with a d= that aligns
  (adkim).

The organizational domain comes from the Public Suffix List as the publicsuffixlist package bundles
it (nothing is downloaded at run time; unknown TLDs such as .test count as public suffixes, so
a.example.test and b.example.test share example.test).  Lookups go straight to the gateway's
Twisted resolver (no thread).

Results: pass (aligned), fail (not aligned; or no usable From: missing, several From fields,
several addresses, no domain), none (no DMARC record), temperror (the policy lookup failed for
now, or SPF/DKIM had a temporary error on an aligned identifier, so the result may still turn into
a pass), permerror (several DMARC records, or one without a valid p= and no rua to fall back on,
RFC 7489 6.6.3).  The policy is p=, or sp= (when present) for a From domain below the
organizational domain whose record was found there.  pct= samples with an injectable random(): a
message outside the sample gets the next milder policy (RFC 7489 6.6.4).  When the From field is
unusable but names domains, the strictest policy among them applies (RFC 7489 6.6.1), so a
second From header cannot smuggle a forged domain past p=reject.

The outcome goes to session.transaction["dmarc"] (a dict: result, domain, policy, disposition,
pct, adkim, aspf, rua, record_domain, org_domain, spf_aligned, dkim_aligned, reason) and to an
AuthResult("dmarc", result, reason, [("header.from", domain), ("policy.dmarc", policy)]).

Verdicts: with [dmarc] enforce = yes a failing message gets its disposition: reject is 550 5.7.1,
quarantine is Verdict.quarantine (or, with quarantine_action = tag, the header
"X-Mailgate-DMARC: fail policy=quarantine"), none goes on.  temperror is 451 4.7.1 with
tempfail_on_error = yes, else the message goes on with "X-Mailgate-DMARC: temperror".  Sessions
with relay_allowed are not checked unless check_internal = yes.
"""

import email.parser
import email.policy
import random as random_module
import re

import attr
from publicsuffixlist import PublicSuffixList
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python import failure
from zope.interface import implementer

from mailgate import resolver as resolvers
from mailgate.filters.dnsbridge import context_value, normalize_domain
from mailgate.interfaces import IFilter
from mailgate.verdict import AuthResult, Verdict

log = Logger()

POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
TAG_HEADER = "X-Mailgate-DMARC"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
# the first tag: its name is case-insensitive, its value DMARC1 is not (RFC 7489 6.4)
_VERSION = re.compile(r"(?i:v)\s*=\s*DMARC1\s*(;|$)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,]+(![0-9]+[kmgt]?)?", re.IGNORECASE)

_psl = None


def public_suffix_list():
    """The Public Suffix List bundled with the publicsuffixlist package, loaded once."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    return _psl


def organizational_domain(domain):
    """RFC 7489 3.2: the public suffix plus one label (a public suffix is its own)."""
    return public_suffix_list().privatesuffix(domain) or domain


def aligned(domain, from_domain, mode):
    """Whether an authenticated domain aligns with the From domain: mode "s" strict, "r" relaxed."""
    domain = normalize_domain(domain or "")
    if domain is None:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


# --- the policy record ---------------------------------------------------------------------------


class DMARCRecordError(Exception):
    """A DMARC record that cannot be used: a permerror."""


class _Temporary(Exception):
    """The policy lookup failed for now: a temperror."""


@attr.s(frozen=True, slots=True)
class DMARCRecord:
    p = attr.ib()
    sp = attr.ib(default=None)
    pct = attr.ib(default=100)
    adkim = attr.ib(default="r")
    aspf = attr.ib(default="r")
    rua = attr.ib(default=())
    text = attr.ib(default="")


def is_dmarc_record(text):
    """Whether a TXT record is a DMARC record (its first tag is v=DMARC1)."""
    return bool(_VERSION.match(text.strip()))


def parse_record(text):
    """
    A DMARCRecord from the text of a DMARC record.  Unknown tags and bad optional values are
    ignored (defaults apply); a bad or missing p= (or a bad sp=) falls back to p=none when rua
    names a valid URI, else it is DMARCRecordError (RFC 7489 6.3, 6.6.3).
    """
    if not is_dmarc_record(text):
        raise DMARCRecordError("not a DMARC record")
    tags = {}
    for part in text.split(";")[1:]:
        if "=" not in part:
            continue
        name, value = part.split("=", 1)
        tags.setdefault(name.strip().lower(), value.strip())
    uris = [uri.strip() for uri in tags.get("rua", "").split(",")]
    rua = tuple(uri for uri in uris if _URI.fullmatch(uri))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if not rua:
            what = "p=%s" % tags["p"] if "p" in tags else "no p="
            if p in POLICIES:
                what = "sp=%s" % tags["sp"]
            raise DMARCRecordError("invalid DMARC record (%s)" % what)
        p, sp = "none", None
    pct = tags.get("pct", "100")
    pct = int(pct) if re.fullmatch(r"[0-9]{1,3}", pct) and int(pct) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DMARCRecord(
        p=p, sp=sp, pct=pct,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        rua=rua, text=text,
    )


# --- the From domain -----------------------------------------------------------------------------


def from_domains(raw):
    """
    The RFC5322.From domains of the message bytes raw -> (domains, problem): problem is None
    when there is exactly one From header field with exactly one address with a valid domain
    (then domains is [that domain]); else it says what is wrong, and domains holds the valid
    domains that were found (A-labels, lower case, no repeats).
    """
    match = _HEADER_END.search(raw)
    block = raw[: match.start()] if match else raw
    if raw.startswith((b"\r\n", b"\n")):
        block = b""
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            block + b"\r\n\r\n"
        )
        froms = headers.get_all("from") or []
    except Exception:  # the email package's header parser has raised on odd input before
        return [], "From header field not parseable"
    if not froms:
        return [], "no From header field"
    domains, count, unusable = [], 0, 0
    for value in froms:
        try:
            addresses = value.addresses
        except Exception:
            unusable += 1
            continue
        for address in addresses:
            count += 1
            domain = _address_domain(address.domain)
            if domain is None:
                unusable += 1
            elif domain not in domains:
                domains.append(domain)
    if len(froms) > 1:
        return domains, "%d From header fields" % len(froms)
    if count > 1:
        return domains, "%d addresses in the From header field" % count
    if count == 0:
        return domains, "no address in the From header field"
    if unusable or not domains:
        return domains, "no valid domain in the From header field"
    return domains, None


def _address_domain(text):
    try:
        # Raw UTF-8 (RFC 6532) comes through the parser as surrogate escapes.
        text = (text or "").encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None
    return normalize_domain(text)


# --- the filter --------------------------------------------------------------------------------


def make(context):
    """The filter as the chain builds it: context has config, reactor, resolver (and random)."""
    config = context_value(context, "config")
    return DMARCFilter(
        config.dmarc,
        context_value(context, "resolver"),
        random=context_value(context, "random") or random_module.random,
    )


@implementer(IFilter)
class DMARCFilter:
    """
    dmarc_config: mailgate.config.DMARCConfig; resolver: the gateway's IResolver; random: a
    function returning a float in [0, 1) for pct sampling (tests pass a seeded one).
    """

    name = "dmarc"

    def __init__(self, dmarc_config, resolver, random=random_module.random):
        self.config = dmarc_config
        self.resolver = resolver
        self.random = random
        public_suffix_list()  # loaded now rather than while the first message waits

    def on_data(self, session, message):
        if session.relay_allowed and not self.config.check_internal:
            return Verdict.next()
        return defer.Deferred.fromCoroutine(self._evaluate(session, bytes(message.raw)))

    async def _evaluate(self, session, raw):
        spf = session.transaction.get("spf")
        dkims = session.transaction.get("dkim") or []
        domains, problem = from_domains(raw)
        if problem is None:
            outcome = await self._check(domains[0], spf, dkims)
        else:
            outcome = await self._check_unusable_from(domains, problem)
        session.transaction["dmarc"] = outcome
        props = []
        if outcome["domain"]:
            props.append(("header.from", outcome["domain"]))
        if outcome["policy"]:
            props.append(("policy.dmarc", outcome["policy"]))
        session.transaction.setdefault("auth_results", []).append(
            AuthResult("dmarc", outcome["result"], outcome["reason"], props)
        )
        log.debug("DMARC {result} for {domain}: policy {policy}, disposition {disposition}",
                  result=outcome["result"], domain=outcome["domain"] or domains,
                  policy=outcome["policy"], disposition=outcome["disposition"])
        return self._verdict(outcome, domains)

    async def _check(self, domain, spf, dkims):
        org = organizational_domain(domain)
        outcome = _outcome(domain, org)
        try:
            record, found_at = await self._discover(domain, org)
        except _Temporary as e:
            outcome.update(result="temperror", reason="DMARC policy lookup failed: %s" % (e,))
            return outcome
        except DMARCRecordError as e:
            outcome.update(result="permerror", reason=str(e))
            return outcome
        if record is None:
            outcome.update(result="none")
            return outcome
        policy = record.p if found_at == domain else (record.sp or record.p)
        outcome.update(policy=policy, pct=record.pct, adkim=record.adkim, aspf=record.aspf,
                       rua=record.rua, record_domain=found_at)
        spf_pass = bool(spf) and spf.get("result") == "pass"
        outcome["spf_aligned"] = spf_pass and aligned(spf.get("domain"), domain, record.aspf)
        outcome["dkim_aligned"] = any(
            d.get("result") == "pass" and aligned(d.get("domain"), domain, record.adkim)
            for d in dkims
        )
        if outcome["spf_aligned"] or outcome["dkim_aligned"]:
            outcome.update(result="pass")
            return outcome
        pending = []
        if spf and spf.get("result") == "temperror" and aligned(spf.get("domain"), domain,
                                                                record.aspf):
            pending.append("SPF")
        if any(d.get("result") == "temperror" and aligned(d.get("domain"), domain, record.adkim)
               for d in dkims):
            pending.append("DKIM")
        if pending:
            reason = "%s temporary error on an aligned identifier" % " and ".join(pending)
            outcome.update(result="temperror", reason=reason)
            return outcome
        outcome.update(result="fail", disposition=self._sample(policy, record.pct))
        if outcome["disposition"] != policy:
            outcome["reason"] = "pct=%d: %s applied" % (record.pct, outcome["disposition"])
        return outcome

    async def _check_unusable_from(self, domains, problem):
        """A From field DMARC cannot evaluate: fail, with the strictest policy of its domains."""
        outcome = _outcome(None, None)
        outcome.update(result="fail", reason=problem)
        strictest = None
        for domain in domains[:5]:  # a few lookups, not one per address of a long list
            try:
                record, found_at = await self._discover(domain, organizational_domain(domain))
            except (_Temporary, DMARCRecordError):
                continue
            if record is None:
                continue
            policy = record.p if found_at == domain else (record.sp or record.p)
            if strictest is None or POLICIES.index(policy) > POLICIES.index(strictest[0]):
                strictest = (policy, record.pct)
        if strictest is not None:
            policy, pct = strictest
            outcome.update(policy=policy, pct=pct, disposition=self._sample(policy, pct))
        return outcome

    def _sample(self, policy, pct):
        """The policy to apply to a failing message: outside the pct sample, the next milder one."""
        if policy == "none" or pct >= 100:
            return policy
        if self.random() * 100 < pct:
            return policy
        return _MILDER[policy]

    async def _discover(self, domain, org):
        """-> (DMARCRecord, the domain it was found at) or (None, None) (RFC 7489 6.6.3)."""
        for name in [domain] if org == domain else [domain, org]:
            records = await self._records("_dmarc." + name)
            if len(records) > 1:
                raise DMARCRecordError("%d DMARC records at _dmarc.%s" % (len(records), name))
            if records:
                return parse_record(records[0]), name
        return None, None

    async def _records(self, name):
        """The DMARC records (str) among the TXT records of name."""
        try:
            found = await resolvers.lookup_records(self.resolver, name, dns.TXT)
        except error.DNSNameError:
            return []
        except Exception as e:
            raise _Temporary("%s: %s" % (name, resolvers.describe_failure(failure.Failure(e))))
        texts = [b"".join(payload.data).decode("utf-8", "replace") for _, payload in found]
        return [text for text in texts if is_dmarc_record(text)]

    def _verdict(self, outcome, domains):
        shown = outcome["domain"] or ", ".join(domains) or "an unknown domain"
        if outcome["result"] == "temperror":
            if self.config.tempfail_on_error:
                text = "Temporary error evaluating the DMARC policy of %s; try again later" % shown
                return Verdict.tempfail(451, "4.7.1", text)
            return Verdict.next().with_headers([(TAG_HEADER, "temperror")])
        if outcome["result"] != "fail" or not self.config.enforce:
            return Verdict.next()
        disposition = outcome["disposition"]
        if disposition == "reject":
            text = ("Unauthenticated email from %s is not accepted due to domain's DMARC policy"
                    % shown)
            return Verdict.reject(550, "5.7.1", text)
        if disposition == "quarantine":
            if self.config.quarantine_action == "tag":
                return Verdict.next().with_headers([(TAG_HEADER, "fail policy=quarantine")])
            return Verdict.quarantine("DMARC policy of %s: quarantine" % shown)
        return Verdict.next()


def _outcome(domain, org):
    return {
        "result": None,
        "domain": domain,
        "org_domain": org,
        "policy": None,
        "disposition": "none",
        "pct": None,
        "adkim": None,
        "aspf": None,
        "rua": (),
        "record_domain": None,
        "spf_aligned": False,
        "dkim_aligned": False,
        "reason": None,
    }
