"""
``mailgate diagnose DOMAIN``: is DOMAIN set up to receive mail, and to have its mail trusted?

MX records, the addresses of each MX, each MX's SMTP server (banner, STARTTLS, and every
certificate check of ``mailgate check-tls``), SPF, a DKIM selector, DMARC and MTA-STS.  The result
is a list of mailgate.ops.checktls.Finding (OK, WARN, FAIL, INFO), printed one per line.

DNS is asked with dnspython, blocking (a command line tool): the [dns] nameservers of the
configuration when it names some (never the system's resolver then), else the system's resolver.
"""

import base64
import binascii
import ipaddress
import re

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgate.smtp.address import is_ip_address
from mailgate.ops import checktls
from mailgate.ops.checktls import FAIL, INFO, OK, WARN, Finding

SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4
_SPF_MAX_RECORDS_FETCHED = 40  # includes followed at most, whatever the record says
DEFAULT_DNS_TIMEOUT = 5.0


# --- DNS ---------------------------------------------------------------------------------------


class DNSFailure(Exception):
    """A lookup failed for a reason other than "no such name / no such record": args[0] says why."""


class Answer:
    """The records of one lookup (rdata objects), [] for NXDOMAIN or no data; nxdomain tells."""

    def __init__(self, records, nxdomain=False, canonical=None):
        self.records = records
        self.nxdomain = nxdomain
        self.canonical = canonical  # the name the records were found at (after CNAMEs)


class Lookups:
    """Blocking DNS lookups with dnspython, for the diagnostic commands."""

    def __init__(self, resolver):
        self.resolver = resolver

    @classmethod
    def from_config(cls, dns_config=None):
        """
        The [dns] nameservers when dns_config names some (and only those), else the system's
        resolver (/etc/resolv.conf).  Each server gets dns_config.timeout.
        """
        timeout = dns_config.timeout if dns_config is not None else DEFAULT_DNS_TIMEOUT
        servers = tuple(dns_config.nameservers) if dns_config is not None else ()
        if servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(str(ip), int(port)) for ip, port in servers
            ]
        else:
            resolver = dns.resolver.Resolver()
        resolver.timeout = timeout
        resolver.lifetime = timeout * max(1, len(resolver.nameservers))
        resolver.cache = None
        return cls(resolver)

    def query(self, name, rtype):
        """An Answer; DNSFailure for timeouts, SERVFAIL, REFUSED, bad names..."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DNSFailure("%r is not a valid domain name (%s)" % (name, e))
        try:
            answer = self.resolver.resolve(
                qname, rtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Answer([], nxdomain=True)
        except dns.resolver.NoNameservers as e:
            raise DNSFailure("no nameserver answered (SERVFAIL or refused): %s" % (_first(e),))
        except dns.exception.Timeout:
            raise DNSFailure("timeout: no answer within %g seconds" % (self.resolver.lifetime,))
        except dns.exception.DNSException as e:
            raise DNSFailure("%s: %s" % (e.__class__.__name__, _first(e)))
        records = list(answer.rrset) if answer.rrset is not None else []
        canonical = answer.canonical_name.to_text(omit_final_dot=True)
        return Answer(records, canonical=canonical)

    def txt(self, name):
        """The TXT strings of name (each record's strings joined), in order; [] when none."""
        return [_txt(rdata) for rdata in self.query(name, "TXT").records]

    def addresses(self, name):
        """A then AAAA addresses of name as str (for check-tls); DNSFailure when both fail."""
        found, failures = [], []
        for rtype in ("A", "AAAA"):
            try:
                found += [rdata.address for rdata in self.query(name, rtype).records]
            except DNSFailure as e:
                failures.append(e)
        if not found and failures:
            raise LookupError("cannot look up %s: %s" % (name, failures[0]))
        return found


def _first(exception):
    text = str(exception)
    return text.splitlines()[0] if text else exception.__class__.__name__


def _txt(rdata):
    return b"".join(rdata.strings).decode("utf-8", "replace")


def _records(txts, prefix):
    """The TXT strings that start with a version tag such as v=spf1 (then a space or the end)."""
    pattern = re.compile(re.escape(prefix) + r"(\s|;|$)", re.IGNORECASE)
    return [t for t in txts if pattern.match(t.strip())]


# --- the whole diagnosis -----------------------------------------------------------------------


def diagnose(domain, lookups, mx_port=25, selector=None, cafile=None,
             timeout=checktls.DEFAULT_TIMEOUT, ehlo_name="localhost", probe=None):
    """Every finding about domain, in order.  probe: checktls.probe (replaceable for tests)."""
    domain = domain.strip().rstrip(".").lower()
    probe = probe or checktls.probe
    findings = []
    hosts, exists = _mx(domain, lookups, findings)
    if not exists:
        return findings
    for host in hosts:
        for address in _addresses(host, lookups, findings):
            label = "%s[%s]" % (host, address)
            for finding in probe(address, mx_port, host, cafile, None, timeout, ehlo_name):
                findings.append(finding.prefixed(label))
    findings += check_spf(domain, lookups)
    if selector:
        findings += check_dkim(domain, selector, lookups)
    findings += check_dmarc(domain, lookups)
    findings += check_mta_sts(domain, lookups)
    return findings


def _mx(domain, lookups, findings):
    """(MX host names to check, whether the domain exists); findings appended."""
    try:
        answer = lookups.query(domain, "MX")
    except DNSFailure as e:
        findings.append(Finding(FAIL, "mx", "cannot look up the MX records of %s: %s"
                                % (domain, e)))
        return [], True
    if answer.nxdomain:
        findings.append(Finding(FAIL, "mx", "%s does not exist in DNS (NXDOMAIN): nobody can"
                                " send mail to it" % (domain,)))
        return [], False
    records = sorted(
        (rdata.preference, rdata.exchange.to_text(omit_final_dot=True).lower())
        for rdata in answer.records
    )
    null = [r for r in answer.records if r.exchange == dns.name.root]
    if null and len(null) == len(records):
        findings.append(Finding(FAIL, "mx", "null MX (%s): %s does not accept mail"
                                " (RFC 7505)" % (_mx_text(records), domain)))
        return [], True
    if null:
        findings.append(Finding(FAIL, "mx", "a null MX (\".\") among other MX records (%s):"
                                " RFC 7505 allows it only alone, as \"0 .\"; remove it or the"
                                " others" % (_mx_text(records),)))
        records = [r for r in records if r[1] not in (".", "")]
    if not records:
        findings.append(Finding(WARN, "mx", "no MX records: senders fall back to the address"
                                " of %s itself (implicit MX); publish an MX record" % (domain,)))
        return [domain], True
    findings.append(Finding(OK, "mx", "%d MX record%s: %s" % (
        len(records), "" if len(records) == 1 else "s", _mx_text(records))))
    hosts = []
    for _, host in records:
        if host not in hosts:
            hosts.append(host)
    return hosts, True


def _mx_text(records):
    return ", ".join("%d %s" % (preference, host) for preference, host in records)


def _addresses(host, lookups, findings):
    """The A and AAAA addresses of an MX host, checked; findings appended."""
    check = "%s addresses" % (host,)
    if is_ip_address(host):
        findings.append(Finding(FAIL, check, "the MX names an IP address, not a host name:"
                                " senders look %s up as a name and find nothing" % (host,)))
        return []
    found, failures, canonical = {}, [], None
    for rtype in ("A", "AAAA"):
        try:
            answer = lookups.query(host, rtype)
        except DNSFailure as e:
            failures.append("%s: %s" % (rtype, e))
            found[rtype] = []
            continue
        found[rtype] = [rdata.address for rdata in answer.records]
        if answer.records and answer.canonical and answer.canonical.lower() != host:
            canonical = answer.canonical
    addresses = found["A"] + found["AAAA"]
    if failures:
        findings.append(Finding(FAIL if not addresses else WARN, check, "lookup failed (%s)"
                                % ("; ".join(failures),)))
    if not addresses:
        if not failures:
            findings.append(Finding(FAIL, check, "%s has no A or AAAA records: senders cannot"
                                    " reach this MX" % (host,)))
        return []
    if canonical:
        findings.append(Finding(WARN, check, "%s is an alias (CNAME) of %s: an MX must name the"
                                " host itself (RFC 2181 10.3)" % (host, canonical)))
    findings.append(Finding(OK, check, ", ".join(addresses)))
    if not found["AAAA"] and not any("AAAA" in f for f in failures):
        findings.append(Finding(INFO, check, "no IPv6 address (AAAA record): senders reach %s"
                                " over IPv4 only" % (host,)))
    return addresses


# --- SPF (RFC 7208) ----------------------------------------------------------------------------


class SPFSyntaxError(ValueError):
    pass


_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z", re.DOTALL)
_MACRO = re.compile(r"%\{[slodiphcrtvSLODIPHCRTV][0-9]*[rR]?[.\-+,/_=]*\}|%%|%_|%-")
_DOMAIN_CHARS = re.compile(r"[A-Za-z0-9_.-]+\Z")
_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")


class SPFTerm:
    def __init__(self, kind, qualifier="+", value=None):
        self.kind = kind  # a mechanism name, "redirect", "exp", or another modifier's name
        self.qualifier = qualifier
        self.value = value  # domain-spec, address, or None

    @property
    def has_macro(self):
        return bool(self.value) and "%" in self.value


def parse_spf(record):
    """The terms of an SPF record (SPFTerm list); SPFSyntaxError naming the bad term."""
    words = record.split()
    if not words or words[0].lower() != "v=spf1":
        raise SPFSyntaxError("the record must start with v=spf1")
    terms, seen = [], set()
    for word in words[1:]:
        term = _spf_term(word)
        if term.kind in ("redirect", "exp"):
            if term.kind in seen:
                raise SPFSyntaxError("%s= appears twice" % (term.kind,))
            seen.add(term.kind)
        terms.append(term)
    return terms


def _spf_term(word):
    modifier = _MODIFIER.match(word)
    if modifier and modifier.group(1).lower() not in _MECHANISMS:
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            _domain_spec(word, value)
        return SPFTerm(name, value=value)
    qualifier = "+"
    if word[:1] in "+-~?" and word[:1]:
        qualifier, word = word[0], word[1:]
    name = re.match(r"[A-Za-z0-9]*", word).group(0).lower()
    rest = word[len(name):]
    if name not in _MECHANISMS:
        raise SPFSyntaxError("unknown term %r" % (word,))
    if name == "all":
        if rest:
            raise SPFSyntaxError("%r: all takes no argument" % (word,))
        return SPFTerm(name, qualifier)
    if name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise SPFSyntaxError("%r: %s needs a domain, as %s:example.com" % (word, name, name))
        return SPFTerm(name, qualifier, _domain_spec(word, rest[1:]))
    if name == "ptr":
        value = None
        if rest:
            if not rest.startswith(":"):
                raise SPFSyntaxError("bad term %r" % (word,))
            value = _domain_spec(word, rest[1:])
        return SPFTerm(name, qualifier, value)
    if name in ("a", "mx"):
        value, cidr = None, rest
        if rest.startswith(":"):
            value, slash, cidr = rest[1:].partition("/")
            cidr = slash + cidr
            _domain_spec(word, value)
        match = _CIDR.match(cidr)
        if not match or (match.group(1) and int(match.group(1)) > 32) or (
                match.group(2) and int(match.group(2)) > 128):
            raise SPFSyntaxError("%r: bad prefix length" % (word,))
        return SPFTerm(name, qualifier, value)
    # ip4, ip6
    if not rest.startswith(":"):
        raise SPFSyntaxError("%r: %s needs an address, as %s:192.0.2.0/24" % (word, name, name))
    try:
        network = ipaddress.ip_network(rest[1:], strict=False)
    except ValueError:
        raise SPFSyntaxError("%r: not an IP address or network" % (word,))
    if network.version != (4 if name == "ip4" else 6):
        raise SPFSyntaxError("%r: not an IPv%s address" % (word, name[-1]))
    return SPFTerm(name, qualifier, rest[1:])


def _domain_spec(word, value):
    """A domain-spec: a domain name, or macro text (RFC 7208 7.1); SPFSyntaxError if neither."""
    plain = _MACRO.sub("x", value)
    if "%" in plain or not value:
        raise SPFSyntaxError("%r: bad macro or empty domain" % (word,))
    labels = plain.rstrip(".").split(".")
    if not _DOMAIN_CHARS.match(plain) or any(not label for label in labels):
        raise SPFSyntaxError("%r: %r is not a domain name" % (word, value))
    if "%" not in value and len(labels) < 2:
        raise SPFSyntaxError("%r: %r is not a fully qualified domain name" % (word, value))
    return value


def check_spf(domain, lookups):
    try:
        txts = lookups.txt(domain)
    except DNSFailure as e:
        return [Finding(FAIL, "spf", "cannot look up the TXT records of %s: %s" % (domain, e))]
    records = _records(txts, "v=spf1")
    if not records:
        return [Finding(WARN, "spf", "no SPF record (a TXT record starting v=spf1): receivers"
                        " cannot tell which servers may send mail as %s" % (domain,))]
    if len(records) > 1:
        return [Finding(FAIL, "spf", "%d SPF records: receivers treat that as a permanent error"
                        " (RFC 7208 4.5), so SPF fails for all mail; merge them into one"
                        % (len(records),))]
    record = records[0].strip()
    findings = [Finding(OK, "spf", "one SPF record: %s" % (record,))]
    try:
        terms = parse_spf(record)
    except SPFSyntaxError as e:
        findings.append(Finding(FAIL, "spf syntax", "%s: receivers treat the record as a"
                                " permanent error" % (e,)))
        return findings
    findings.append(Finding(OK, "spf syntax", "%s, all valid" % (_plural(len(terms), "term"),)))
    findings += _spf_policy(terms)
    count, problems = _spf_count(lookups, domain, terms, [domain], {"fetched": 0})
    for status, text in problems:
        findings.append(Finding(status, "spf includes", text))
    findings.append(_spf_count_finding(count))
    return findings


def _spf_policy(terms):
    findings = []
    if any(t.kind == "ptr" for t in terms):
        findings.append(Finding(WARN, "spf syntax", "the ptr mechanism is slow and unreliable;"
                                " RFC 7208 5.5 says not to use it"))
    alls = [t for t in terms if t.kind == "all"]
    redirect = any(t.kind == "redirect" for t in terms)
    if alls and alls[0].qualifier == "+":
        findings.append(Finding(WARN, "spf policy", "+all lets every server on the internet send"
                                " as this domain: use -all or ~all"))
    elif alls and alls[0].qualifier == "?":
        findings.append(Finding(INFO, "spf policy", "?all: neutral for servers not listed"
                                " (no protection against forgery)"))
    elif not alls and not redirect:
        findings.append(Finding(INFO, "spf policy", "no all mechanism: servers not listed get a"
                                " neutral result; end the record with -all or ~all"))
    return findings


def _spf_count(lookups, domain, terms, stack, budget):
    """(DNS-querying terms, nested includes and redirect counted; [(status, problem)])."""
    count, problems = 0, []
    has_all = any(t.kind == "all" for t in terms)
    for term in terms:
        if term.kind not in _LOOKUP_TERMS or (term.kind == "redirect" and has_all):
            continue  # redirect is ignored when all is present (RFC 7208 6.1)
        count += 1
        if term.kind not in ("include", "redirect"):
            continue
        target = term.value
        where = "%s:%s" % (term.kind, target) if term.kind == "include" else "redirect=" + target
        if term.has_macro:
            problems.append((INFO, "%s (in %s) uses macros: its lookups depend on the sender and"
                             " are not counted here" % (where, domain)))
            continue
        target = target.rstrip(".").lower()
        if target in stack:
            problems.append((FAIL, "%s (in %s) loops back to %s: a permanent error"
                             % (where, domain, target)))
            continue
        if count > SPF_LOOKUP_LIMIT or budget["fetched"] >= _SPF_MAX_RECORDS_FETCHED:
            continue  # over the limit already: no need to look further
        budget["fetched"] += 1
        try:
            records = _records(lookups.txt(target), "v=spf1")
        except DNSFailure as e:
            problems.append((WARN, "cannot look up %s (in %s): %s" % (where, domain, e)))
            continue
        if len(records) != 1:
            problems.append((FAIL, "%s (in %s): %s, a permanent error for receivers" % (
                where, domain, "no SPF record there" if not records
                else "%d SPF records there" % (len(records),))))
            continue
        try:
            nested = parse_spf(records[0].strip())
        except SPFSyntaxError as e:
            problems.append((FAIL, "%s (in %s): syntax error there: %s" % (where, domain, e)))
            continue
        more, deeper = _spf_count(lookups, target, nested, stack + [target], budget)
        count += more
        problems += deeper
    return count, problems


def _spf_count_finding(count):
    what = ("%s (include, a, mx, ptr, exists, redirect; nested includes counted)"
            % (_plural(count, "DNS-querying term"),))
    if count > SPF_LOOKUP_LIMIT:
        return Finding(FAIL, "spf lookups", "%s: over the limit of %d, so receivers treat the"
                       " record as a permanent error; flatten includes or drop some"
                       % (what, SPF_LOOKUP_LIMIT))
    if count >= SPF_LOOKUP_LIMIT - 1:
        return Finding(WARN, "spf lookups", "%s: at the edge of the limit of %d; one more"
                       " include will break SPF" % (what, SPF_LOOKUP_LIMIT))
    return Finding(OK, "spf lookups", "%s, within the limit of %d" % (what, SPF_LOOKUP_LIMIT))


def _plural(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


# --- DKIM (RFC 6376 3.6.1) ---------------------------------------------------------------------


class TagError(ValueError):
    pass


def parse_tags(text):
    """A tag=value list (DKIM, DMARC) as an ordered dict with lower-case names; TagError."""
    tags = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise TagError("%r is not a tag=value pair" % (part,))
        if name.lower() in tags:
            raise TagError("the tag %s= appears twice" % (name,))
        tags[name.lower()] = value.strip()
    return tags


def check_dkim(domain, selector, lookups):
    name = "%s._domainkey.%s" % (selector, domain)
    check = "dkim %s" % (selector,)
    try:
        answer = lookups.query(name, "TXT")
    except DNSFailure as e:
        return [Finding(FAIL, check, "cannot look up %s: %s" % (name, e))]
    txts = [_txt(rdata) for rdata in answer.records]
    if not txts:
        return [Finding(FAIL, check, "no TXT record at %s: mail signed with selector %s fails"
                        " DKIM" % (name, selector))]
    if len(txts) > 1:
        return [Finding(FAIL, check, "%d TXT records at %s: verifiers may pick any of them;"
                        " publish exactly one" % (len(txts), name))]
    try:
        tags = parse_tags(txts[0])
    except TagError as e:
        return [Finding(FAIL, check, "the record at %s is not a DKIM key record: %s"
                        % (name, e))]
    findings = []
    version = tags.get("v")
    if version is None:
        findings.append(Finding(WARN, check, "no v=DKIM1 tag: allowed, but recommended first"))
    elif version != "DKIM1" or next(iter(tags)) != "v":
        return [Finding(FAIL, check, "v=%s%s: a DKIM key record has v=DKIM1 as its first tag"
                        % (version, "" if next(iter(tags)) == "v" else " not first"))]
    key_type = tags.get("k", "rsa").lower()
    if key_type not in ("rsa", "ed25519"):
        return findings + [Finding(FAIL, check, "k=%s: unknown key type (rsa or ed25519)"
                                   % (key_type,))]
    if "p" not in tags:
        return findings + [Finding(FAIL, check, "no p= tag: the record holds no public key")]
    data = re.sub(r"\s+", "", tags["p"])
    if not data:
        return findings + [Finding(FAIL, check, "p= is empty: the key was revoked, mail signed"
                                   " with selector %s fails DKIM" % (selector,))]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return findings + [Finding(FAIL, check, "p= is not valid base64")]
    try:
        description = _dkim_key(key_type, raw)
    except ValueError as e:
        return findings + [Finding(FAIL, check, "p= is not a usable %s public key: %s"
                                   % (key_type, e))]
    status, text = description
    findings.append(Finding(status, check, "%s: %s" % (name, text)))
    if "y" in [flag.strip() for flag in tags.get("t", "").split(":")]:
        findings.append(Finding(INFO, check, "t=y: the domain is testing DKIM; verifiers may"
                                " ignore failures"))
    return findings


def _dkim_key(key_type, raw):
    """(status, description) of a DKIM public key; ValueError when it is not one."""
    if key_type == "ed25519":
        if len(raw) != 32:
            raise ValueError("an ed25519 key is 32 bytes, this is %d" % (len(raw),))
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
        return OK, "ed25519 key"
    try:
        key = serialization.load_der_public_key(raw)
    except (ValueError, TypeError):
        pem = b"-----BEGIN RSA PUBLIC KEY-----\n%s\n-----END RSA PUBLIC KEY-----\n" % (
            base64.encodebytes(raw).strip(),)
        try:
            key = serialization.load_pem_public_key(pem)  # PKCS#1 RSAPublicKey, also seen
        except (ValueError, TypeError):
            raise ValueError("not a DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("k=rsa, but the key is %s" % (type(key).__name__,))
    bits = key.key_size
    if bits < 1024:
        return FAIL, "rsa %d-bit key: verifiers reject keys under 1024 bits (RFC 8301)" % (bits,)
    if bits < 2048:
        return WARN, "rsa %d-bit key: weak; use 2048 bits (RFC 8301)" % (bits,)
    return OK, "rsa %d-bit key" % (bits,)


# --- DMARC (RFC 7489) --------------------------------------------------------------------------


_POLICIES = ("none", "quarantine", "reject")


def check_dmarc(domain, lookups):
    name = "_dmarc." + domain
    try:
        records = _records(lookups.txt(name), "v=DMARC1")
    except DNSFailure as e:
        return [Finding(FAIL, "dmarc", "cannot look up %s: %s" % (name, e))]
    inherited = None
    if not records:
        organizational = _organizational(domain)
        if organizational != domain:
            try:
                records = _records(lookups.txt("_dmarc." + organizational), "v=DMARC1")
            except DNSFailure:
                records = []
            if records:
                inherited = organizational
    if not records:
        return [Finding(WARN, "dmarc", "no DMARC record at %s: receivers have no policy for mail"
                        " that fails SPF and DKIM, and you get no reports" % (name,))]
    where = name if inherited is None else "_dmarc." + inherited
    if len(records) > 1:
        return [Finding(FAIL, "dmarc", "%d DMARC records at %s: receivers ignore them all"
                        " (RFC 7489 6.6.3); publish exactly one" % (len(records), where))]
    try:
        tags = parse_tags(records[0])
    except TagError as e:
        return [Finding(FAIL, "dmarc", "the record at %s cannot be parsed: %s" % (where, e))]
    if next(iter(tags)) != "v" or tags["v"] != "DMARC1":
        return [Finding(FAIL, "dmarc", "the record at %s must start with v=DMARC1" % (where,))]
    findings = [Finding(OK, "dmarc", "one DMARC record at %s: %s" % (where, records[0].strip()))]
    if inherited is not None:
        findings.append(Finding(INFO, "dmarc", "no record at %s: the organizational domain's"
                                " record at %s applies (its sp=, else p=)" % (name, where)))
    key = "sp" if inherited is not None and "sp" in tags else "p"
    policy = tags.get(key)
    if policy is None:
        return findings + [Finding(FAIL, "dmarc", "no p= tag at %s: the record is invalid"
                                   % (where,))]
    if policy.lower() not in _POLICIES:
        return findings + [Finding(FAIL, "dmarc", "%s=%s at %s: must be none, quarantine or"
                                   " reject" % (key, policy, where))]
    policy = policy.lower()
    if policy == "none":
        findings.append(Finding(WARN, "dmarc policy", "%s=none: monitoring only, receivers"
                                " deliver forged mail as usual; move to quarantine or reject"
                                " once the reports look clean" % (key,)))
    else:
        findings.append(Finding(OK, "dmarc policy", "%s=%s: receivers %s mail that fails"
                                " DMARC" % (key, policy, "reject" if policy == "reject"
                                            else "quarantine (spam folder)")))
    if "sp" in tags and inherited is None:
        sp = tags["sp"].lower()
        if sp not in _POLICIES:
            findings.append(Finding(FAIL, "dmarc policy", "sp=%s: must be none, quarantine or"
                                    " reject" % (tags["sp"],)))
        else:
            findings.append(Finding(INFO, "dmarc policy", "sp=%s for subdomains" % (sp,)))
    if "pct" in tags and tags["pct"].strip() != "100":
        findings.append(Finding(INFO, "dmarc policy", "pct=%s: the policy applies to that"
                                " percentage of failing mail only" % (tags["pct"],)))
    findings += _dmarc_reports(tags)
    return findings


def _dmarc_reports(tags):
    rua = [uri.strip() for uri in tags.get("rua", "").split(",") if uri.strip()]
    if not rua:
        return [Finding(INFO, "dmarc reports", "no rua=: you receive no aggregate reports"
                        " (add rua=mailto:dmarc-reports@your-domain)")]
    bad = [uri for uri in rua if not uri.lower().startswith("mailto:")]
    if bad:
        return [Finding(WARN, "dmarc reports", "rua=%s: receivers only send reports to"
                        " mailto: addresses" % (",".join(bad),))]
    return [Finding(INFO, "dmarc reports", "aggregate reports go to %s" % (", ".join(rua),))]


def _organizational(domain):
    try:
        from mailgate.filters.dmarc import organizational_domain
    except ImportError:
        return domain
    try:
        return organizational_domain(domain)
    except Exception:
        return domain


# --- MTA-STS (RFC 8461) ------------------------------------------------------------------------


def check_mta_sts(domain, lookups):
    name = "_mta-sts." + domain
    try:
        records = _records(lookups.txt(name), "v=STSv1")
    except DNSFailure as e:
        return [Finding(WARN, "mta-sts", "cannot look up %s: %s" % (name, e))]
    if not records:
        return [Finding(INFO, "mta-sts", "no MTA-STS policy (no v=STSv1 TXT record at %s)"
                        % (name,))]
    if len(records) > 1:
        return [Finding(WARN, "mta-sts", "%d v=STSv1 records at %s: senders ignore the policy"
                        " (RFC 8461 3.1); publish exactly one" % (len(records), name))]
    try:
        tags = parse_tags(records[0])
    except TagError as e:
        return [Finding(WARN, "mta-sts", "the record at %s cannot be parsed: %s" % (name, e))]
    policy_id = tags.get("id", "")
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", policy_id):
        return [Finding(WARN, "mta-sts", "the record at %s needs id= of 1 to 32 letters and"
                        " digits, not %r" % (name, policy_id))]
    return [Finding(INFO, "mta-sts", "policy published (id=%s); the policy itself"
                    " (https://mta-sts.%s/.well-known/mta-sts.txt) is not fetched by this"
                    " check" % (policy_id, domain))]
