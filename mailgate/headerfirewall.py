"""
The header firewall: header fields removed by name, on bytes, before a message goes on.

Exchange trusts its own X-MS-Exchange-Organization-* (and -Forest-*, -Transport-*) fields: the
spam verdict, whether the sender authenticated, the message's "internal" standing.  Mail from
the internet must not carry them in (a listener's header_firewall, plus [gateway]
strip_headers), and mail leaving for the internet must not carry them out (a route's
strip_headers, before DKIM signing).  Only the header block is looked at (up to the first empty
line); a field's folded continuation lines go with it; everything else is kept byte for byte
(no parsing, no re-serialising, so other signatures stay valid).  What was removed is reported
as counts by name, never values.
"""

import re

from mailgate.config.delivery import EXCHANGE_HEADERS

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def inbound_patterns(listener, gateway):
    """What a listener's firewall removes: Exchange's fields and [gateway] strip_headers."""
    if not listener.header_firewall:
        return ()
    return EXCHANGE_HEADERS + tuple(gateway.strip_headers)


def _matcher(patterns):
    exact = {p for p in patterns if not p.endswith("*")}
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
    return lambda name: name in exact or (bool(prefixes) and name.startswith(prefixes))


def strip(data, patterns):
    """
    (data without the header fields whose lower-case name matches patterns, {name: count}).
    patterns: lower-case names, or prefixes ending in "*".  data is returned as it is (the same
    object) when nothing matches.
    """
    if not patterns:
        return data, {}
    end = data.find(b"\r\n\r\n")
    head_end = len(data) if end < 0 else end + 2
    if data.startswith(b"\r\n"):
        return data, {}  # no header block at all
    matches = _matcher(patterns)
    kept, removed, dropping = [], {}, False
    position = 0
    head = data[:head_end]
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and position:
            if not dropping:
                kept.append(line)
        else:
            field = _FIELD.match(line)
            name = field.group(1).decode("ascii").lower() if field else None
            dropping = name is not None and matches(name)
            if dropping:
                removed[name] = removed.get(name, 0) + 1
            else:
                kept.append(line)
        position += len(line)
    if not removed:
        return data, {}
    return b"".join(kept) + data[head_end:], removed
