"""
The DKIM verification filter (RFC 6376, RFC 8463 ed25519-sha256, with dkimpy): at end of data it
verifies every DKIM-Signature header field of the message, in the thread pool (dkimpy blocks),
each key looked up through the gateway's resolver (mailgate.filters.dnsbridge; never the system's).

It never rejects: DMARC decides what a failure means.  Each signature's outcome is kept in
session.transaction["dkim"], a list (in header order) of dicts:

    result     "pass" | "fail" | "neutral" | "policy" | "temperror" | "permerror"
    domain     d= (lower case), or None when the signature could not be parsed
    selector   s=
    algorithm  a= ("rsa-sha256", "ed25519-sha256", ...)
    identity   i= or None
    b          the first 8 characters of b= (RFC 6008), to tell signatures apart
    reason     why, for anything but pass

and each is an AuthResult("dkim", result, reason, [header.d, header.i (when present), header.s,
header.a, header.b]) in session.transaction["auth_results"]; a message without signatures gets
one AuthResult("dkim", "none").

Results (RFC 8601 2.7.1): pass; fail when the body hash or the signature does not match; neutral
when the signature field itself is unusable (bad tag list, missing or bad tags, From not signed,
expired, dated in the future); policy for rsa-sha1 (RFC 8301: verifiers must not accept it);
temperror when the key lookup failed for now (a timeout, SERVFAIL); permerror when there is no
key record or it is unusable (bad syntax, unknown type, RSA under 1024 bits, revoked).

At most max_signatures (the topmost) are verified, so that a message cannot make us do a DNS
lookup and an RSA operation per header line (RFC 6376 6.1 lets verifiers limit the number);
the others are logged and left out.
"""

import binascii
import logging
import re

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from mailgate.filters.dnsbridge import bridge_from_context, context_value
from mailgate.interfaces import IFilter
from mailgate.verdict import AuthResult, Verdict

log = Logger()

MAX_SIGNATURES = 16
MIN_KEY_BITS = 1024  # RFC 8301 3.2: shorter RSA keys are not valid

# dkimpy logs what it rejects through the logging module; our results say it instead.
_quiet = logging.getLogger("mailgate.filters.dkim.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def make(context):
    """The filter as the chain builds it: context has config, reactor, resolver, run_in_thread."""
    bridge = bridge_from_context(context)
    return DKIMFilter(bridge, context_value(context, "run_in_thread"), timeout=bridge.timeout)


class _KeyLookup:
    """dkimpy's dnsfunc for one signature, remembering what the lookup found."""

    def __init__(self, txt):
        self._txt = txt
        self.asked = False
        self.value = None
        self.error = None

    def __call__(self, name, timeout=5):
        self.asked = True
        try:
            self.value = self._txt(name, timeout=timeout)
        except dkim.DnsTimeoutError as e:
            self.error = str(e) or "DNS timeout"
            raise
        return self.value


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def signature_info(value):
    """The parts of a DKIM-Signature field value worth recording (a dict), or None."""
    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError, IndexError):
        return None
    b = re.sub(rb"\s+", b"", tags.get(b"b", b""))
    identity = tags.get(b"i")
    return {
        "domain": _text(re.sub(rb"\s+", b"", tags.get(b"d", b""))).lower().rstrip(".") or None,
        "selector": _text(re.sub(rb"\s+", b"", tags.get(b"s", b""))) or None,
        "algorithm": _text(re.sub(rb"\s+", b"", tags.get(b"a", b""))).lower() or None,
        "identity": _text(re.sub(rb"\s+", b"", identity)) if identity is not None else None,
        "b": _text(b[:8]) or None,
        "signed": [h.strip().lower() for h in tags.get(b"h", b"").split(b":")],
    }


@implementer(IFilter)
class DKIMFilter:
    """
    bridge: a mailgate.filters.dnsbridge.DNSBridge; run_in_thread(f, *args) -> Deferred; timeout: seconds
    one key lookup may take; max_signatures: how many signatures are verified at most.
    """

    name = "dkim"

    def __init__(self, bridge, run_in_thread, timeout=5.0, max_signatures=MAX_SIGNATURES,
                 minkey=MIN_KEY_BITS):
        self.bridge = bridge
        self._run = run_in_thread
        self.timeout = timeout
        self.max_signatures = max_signatures
        self.minkey = minkey

    def on_data(self, session, message):
        d = self._run(self.verify, bytes(message.raw))
        d.addErrback(self._crashed)
        d.addCallback(self._conclude, session)
        return d

    # --- in the thread pool -------------------------------------------------------------------

    def verify(self, raw):
        """Blocking: the result dict of each DKIM-Signature of raw, in header order."""
        try:
            headers, _ = dkim.rfc822_parse(raw)
        except dkim.DKIMException as e:
            if not re.search(rb"(?im)^dkim-signature[ \t]*:", raw.split(b"\r\n\r\n", 1)[0]):
                return []
            return [_result("neutral", None, "message header not parseable: %s" % (e,))]
        values = [v for k, v in headers if k.lower() == b"dkim-signature"]
        if len(values) > self.max_signatures:
            skipped = len(values) - self.max_signatures
            values = values[: self.max_signatures]
        else:
            skipped = 0
        results = []
        for index, value in enumerate(values):
            try:
                results.append(self._verify_one(raw, index, value))
            except Exception:
                outcome = _result("temperror", signature_info(value), "internal error")
                outcome["_failure"] = failure.Failure()
                results.append(outcome)
        if skipped:
            results.append({"_skipped": skipped})
        return results

    def _verify_one(self, raw, index, value):
        info = signature_info(value)
        if info is None:
            return _result("neutral", None, "signature field not parseable")
        if info["algorithm"] == "rsa-sha1":
            return _result("policy", info, "rsa-sha1 is not accepted (RFC 8301)")
        if b"from" not in info["signed"]:
            return _result("neutral", info, "From header field not signed (RFC 6376 6.1.1)")
        lookup = _KeyLookup(self.bridge.dkim_txt)
        try:
            verifier = dkim.DKIM(raw, logger=_quiet, minkey=self.minkey, timeout=self.timeout)
            ok = verifier.verify(idx=index, dnsfunc=lookup)
        except dkim.ValidationError as e:
            if not lookup.asked:
                return _result("neutral", info, "invalid signature: %s" % (_text(str(e)),))
            if "body hash mismatch" in str(e):
                return _result("fail", info, "body hash mismatch")
            return _result("permerror", info, "key not usable: %s" % (e,))
        except (dkim.KeyFormatError, dkim.UnknownKeyTypeError, dkim.NaClNotFoundError) as e:
            return _result("permerror", info, "key not usable: %s" % (e,))
        except dkim.DKIMException as e:
            return _result("neutral", info, "invalid signature: %s" % (e,))
        if ok:
            return _result("pass", info, None)
        if lookup.error is not None:
            return _result("temperror", info, "key lookup failed: %s" % (lookup.error,))
        if not lookup.asked:
            return _result("neutral", info, "signature not verifiable")
        if not lookup.value:
            return _result("permerror", info, "no key for signature")
        try:
            dkim.evaluate_pk(b"key", lookup.value)
        except (dkim.KeyFormatError, binascii.Error, ValueError) as e:
            return _result("permerror", info, "key not usable: %s" % (e,))
        return _result("fail", info, "signature did not verify")

    # --- back on the reactor thread -----------------------------------------------------------

    def _crashed(self, reason):
        log.failure("DKIM: unexpected error verifying signatures", reason)
        return [_result("temperror", None, "internal error")]

    def _conclude(self, results, session):
        auth = session.transaction.setdefault("auth_results", [])
        recorded = []
        for outcome in results:
            if "_skipped" in outcome:
                log.warn("DKIM: {n} more signatures not verified (limit {limit})",
                         n=outcome["_skipped"], limit=self.max_signatures)
                continue
            crash = outcome.pop("_failure", None)
            if crash is not None:
                log.failure("DKIM: unexpected error verifying a signature", crash)
            recorded.append(outcome)
            auth.append(AuthResult("dkim", outcome["result"], outcome["reason"],
                                   _properties(outcome)))
        if not recorded:
            auth.append(AuthResult("dkim", "none"))
        session.transaction["dkim"] = recorded
        return Verdict.next()


def _result(result, info, reason):
    info = info or {}
    return {
        "result": result,
        "domain": info.get("domain"),
        "selector": info.get("selector"),
        "algorithm": info.get("algorithm"),
        "identity": info.get("identity"),
        "b": info.get("b"),
        "reason": _printable(reason) if reason else None,
    }


def _printable(text, limit=200):
    text = re.sub(r"[^\x20-\x7e]+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _properties(outcome):
    props = []
    for prop, key in (("header.d", "domain"), ("header.i", "identity"), ("header.s", "selector"),
                      ("header.a", "algorithm"), ("header.b", "b")):
        if outcome.get(key):
            props.append((prop, outcome[key]))
    return props
