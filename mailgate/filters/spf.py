"""
The SPF filter (RFC 7208, with pyspf): is the client allowed to send for the envelope sender?

At MAIL FROM it checks the MAIL FROM identity for the client's IP address, or the HELO identity
when MAIL FROM is the null sender <> (RFC 7208 2.4: then the identity is postmaster@HELO).  pyspf
blocks, so the check runs in the thread pool; every DNS question goes to the gateway's resolver
through mailgate.filters.dnsbridge (never to the system resolver), with the RFC 7208 4.6.4 limits on: 10
DNS-querying terms, 2 void lookups, 20 s for the whole check.

The outcome is kept for the other filters (DMARC needs it at end of data) as
session.transaction["spf"], a dict:

    result      "pass" | "fail" | "softfail" | "neutral" | "none" | "temperror" | "permerror"
    domain      the domain checked (A-label, lower case), or the identity as given when it is
                not a domain (an address literal): then the result is "none"
    identity    "mailfrom" | "helo"
    client_ip   the address checked
    reason      why, for none (no domain), temperror and permerror; else None
    explanation what pyspf explains (the domain's exp= text on fail), or ""

and as an AuthResult("spf", result, reason, [("smtp.mailfrom", domain)]) (("smtp.helo", name)
for the HELO identity) in session.transaction["auth_results"].  smtp.mailfrom carries the domain
only: that is what SPF authenticates and what RFC 8601's pvalue allows ([local-part "@"] domain),
and it keeps the sender's mailbox out of a header that travels with the message.

Sessions with session.relay_allowed (authenticated, or in relay_ips) are not checked unless
[spf] check_internal = yes.  The verdict: fail with reject_fail is 550 5.7.23, temperror with
tempfail_on_error is 451 4.7.24, permerror with reject_permerror is 550 5.7.24 (RFC 7372);
anything else goes on to the next filter.
"""

import re

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.filters.dnsbridge import bridge_from_context, context_value, normalize_domain
from mailgate.interfaces import IFilter
from mailgate.resolver import ip_literal
from mailgate.verdict import AuthResult, Verdict

log = Logger()

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# pyspf's explanations when the domain publishes none (exp=): not worth repeating to the client
_DEFAULT_EXPLANATIONS = ("", "SPF fail - not authorized")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_ERROR_PREFIX = re.compile(r"^SPF (Permanent|Temporary) Error: ")


def make(context):
    """The filter as the chain builds it: context has config, reactor, resolver, run_in_thread."""
    config = context_value(context, "config")
    return SPFFilter(
        config.spf,
        bridge_from_context(context),
        context_value(context, "run_in_thread"),
        hostname=config.gateway.hostname,
    )


def printable(text, limit=200):
    """text made safe for an SMTP reply or a header comment: printable ASCII, one line, short."""
    text = _UNPRINTABLE.sub(" ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@implementer(IFilter)
class SPFFilter:
    """
    spf_config: mailgate.config.SPFConfig; bridge: a mailgate.filters.dnsbridge.DNSBridge;
    run_in_thread(f, *args) -> Deferred; hostname: ours (the %{r} macro of explanations).
    budget: seconds for one whole check (RFC 7208 4.6.4 asks for at least 20).
    """

    name = "spf"

    def __init__(self, spf_config, bridge, run_in_thread, hostname="unknown", budget=None):
        self.config = spf_config
        self.bridge = bridge
        self._run = run_in_thread
        self.hostname = hostname
        self.budget = budget

    def on_mail(self, session, sender):
        if session.relay_allowed and not self.config.check_internal:
            return Verdict.next()
        ip = ip_literal(session.client_ip or "")
        if ip is None:  # e.g. a listener on a unix socket: there is no address to check
            log.debug("SPF: no IP address for {session}, not checked", session=session)
            return Verdict.next()
        helo = session.helo or ""
        if sender.is_null:
            identity, given = "helo", helo
            local, address = "postmaster", ""
        else:
            identity, given = "mailfrom", sender.domain
            local, address = sender.local, str(sender)
        domain = None if ip_literal(given) else normalize_domain(given)
        if domain is None or "." not in domain:
            # RFC 7208 4.3: not a multi-label domain name: "none", without asking DNS
            outcome = ("none", "", "no domain to check in %s %r" % (identity, given))
            d = defer.succeed(outcome)
        else:
            d = self._run(self._check, ip, address, helo, local, domain)
            d.addErrback(self._crashed, domain)
        d.addCallback(self._conclude, session, identity, domain or given, ip)
        return d

    def _check(self, ip, address, helo, local, domain):
        """In a pool thread: (result, explanation, problem)."""
        query = self.bridge.spf_query(
            ip, address, helo, local=local, domain=domain, receiver=self.hostname,
            budget=self.budget,
        )
        result, _, explanation = query.check()
        explanation = explanation or ""
        if result in ("temperror", "permerror"):  # the explanation is the error: keep its detail
            problem = _ERROR_PREFIX.sub("", explanation) or getattr(query, "prob", None)
            return result, "", problem
        return result, explanation, None

    def _crashed(self, failure, domain):
        log.failure("SPF: unexpected error checking {domain}", failure, domain=domain)
        return "temperror", "", "internal error"

    def _conclude(self, outcome, session, identity, domain, ip):
        result, explanation, problem = outcome
        if result not in RESULTS:  # "ambiguous" exists only in pyspf's harsh mode
            result, problem = "permerror", "unexpected SPF result %r" % (result,)
        reason = None
        if result in ("none", "temperror", "permerror") and problem:
            reason = printable(problem)
        session.transaction["spf"] = {
            "result": result,
            "domain": domain,
            "identity": identity,
            "client_ip": ip,
            "reason": reason,
            "explanation": explanation,
        }
        prop = "smtp.mailfrom" if identity == "mailfrom" else "smtp.helo"
        session.transaction.setdefault("auth_results", []).append(
            AuthResult("spf", result, reason, [(prop, domain)])
        )
        log.debug("SPF {result} for {domain} ({identity}) from {ip}", result=result,
                  domain=domain, identity=identity, ip=ip)
        return self._verdict(result, domain, ip, explanation, reason)

    def _verdict(self, result, domain, ip, explanation, reason):
        if result == "fail" and self.config.reject_fail:
            text = "SPF validation failed: %s does not designate %s as a permitted sender" % (
                domain, ip)
            if explanation not in _DEFAULT_EXPLANATIONS:
                text += " (%s)" % printable(explanation)
            return Verdict.reject(550, "5.7.23", text)
        if result == "temperror" and self.config.tempfail_on_error:
            text = "SPF temporary error for %s: %s; try again later" % (domain, reason or "DNS")
            return Verdict.tempfail(451, "4.7.24", text)
        if result == "permerror" and self.config.reject_permerror:
            text = "SPF validation error for %s: %s" % (domain, reason or "invalid SPF record")
            return Verdict.reject(550, "5.7.24", text)
        return Verdict.next()
