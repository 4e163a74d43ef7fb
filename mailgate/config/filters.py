"""
[filters], [filter:NAME], [spf], [dmarc] and [attachments]: the settings of every message
filter, the options of a filter of one's own, and the built-in filters' policies.
"""

import attr

from mailgate.config.schema import Key, Section, _plain
from mailgate.config.types import Bool, Choice, Duration, ExtensionList, Int, MimeTypeList, Size


@attr.s(frozen=True, slots=True)
class FiltersConfig:
    timeout = attr.ib(default=30.0)


@attr.s(frozen=True, slots=True)
class FilterSection:
    """[filter:NAME]: options for the filter named NAME in a listener's filters (dotted or not)."""

    name = attr.ib()
    options = attr.ib(default=())  # tuple of (key, str value) pairs, in file order


@attr.s(frozen=True, slots=True)
class SPFConfig:
    reject_fail = attr.ib(default=False)
    tempfail_on_error = attr.ib(default=False)
    reject_permerror = attr.ib(default=False)
    check_internal = attr.ib(default=False)


@attr.s(frozen=True, slots=True)
class DMARCConfig:
    enforce = attr.ib(default=False)
    quarantine_action = attr.ib(default="quarantine")  # "quarantine" | "tag"
    tempfail_on_error = attr.ib(default=False)
    check_internal = attr.ib(default=False)


DEFAULT_BLOCKED_EXTENSIONS = (
    "ade", "adp", "app", "appx", "appxbundle", "application", "bas", "bat", "cab", "chm", "cmd",
    "com", "cpl", "dll", "docm", "dotm", "exe", "gadget", "hta", "img", "inf", "ins", "iso", "isp",
    "jar", "js", "jse", "lnk", "mde", "msc", "msi", "msix", "msp", "mst", "one", "pif", "potm",
    "ppam", "ppsm", "pptm", "ps1", "ps1xml", "ps2", "psc1", "psd1", "psm1", "reg", "scf", "scr",
    "sct", "shb", "shs", "sldm", "url", "vb", "vbe", "vbs", "vhd", "vhdx", "ws", "wsc", "wsf",
    "wsh", "xlam", "xll", "xlsm", "xltm",
)


@attr.s(frozen=True, slots=True)
class AttachmentsConfig:
    blocked_extensions = attr.ib(default=DEFAULT_BLOCKED_EXTENSIONS)  # lower-case, no dot
    blocked_mime_types = attr.ib(default=())  # lower-case "type/subtype" or "type/*"
    detect_executables = attr.ib(default=True)
    action = attr.ib(default="reject")  # "reject" | "quarantine" | "strip"
    max_archive_depth = attr.ib(default=3)
    max_archive_members = attr.ib(default=1000)
    max_expanded_size = attr.ib(default=100 * 1024 * 1024)
    max_compression_ratio = attr.ib(default=100)
    encrypted_archives = attr.ib(default="reject")  # "allow" | "reject"
    max_mime_depth = attr.ib(default=20)
    max_parts = attr.ib(default=500)
    malformed = attr.ib(default="reject")  # "reject" | "accept"


FILTERS_KEYS = {
    "timeout": Key(
        Duration(), "30s",
        doc="How long one filter may take over one message; past it the client is answered with "
        "a temporary error (`451 4.3.0`) and may try again later.",
        example="1m",
    ),
}


def _build_filter_section(name, values):
    return FilterSection(name=name, options=tuple(values.items()))


def _flatten_filter_section(section):
    return section.name, dict(section.options)


# What every [filter:NAME] key is, for the reference: mailgate does not parse these.
FILTER_OPTION = Key(
    None, "",
    type="text, as written",
    default_doc="not set",
    doc="An option of the filter named NAME, handed to it as text and not checked by mailgate.  "
    "Example: `delay = 5m`",
)

_TRUSTED = (
    "Also check clients that are trusted (in the listener's `relay_ips`, or authenticated)."
)

SPF_KEYS = {
    "reject_fail": Key(
        Bool(), "no",
        doc="Refuse mail whose SPF result is `fail`, instead of only recording the result.",
        example="yes",
    ),
    "tempfail_on_error": Key(
        Bool(), "no",
        doc="Answer with a temporary error when the check cannot be completed (`temperror`, such "
        "as a DNS timeout), instead of accepting the mail unchecked.",
        example="yes",
    ),
    "reject_permerror": Key(
        Bool(), "no",
        doc="Refuse mail whose sender domain publishes a broken SPF record (`permerror`).",
        example="yes",
    ),
    "check_internal": Key(Bool(), "no", doc=_TRUSTED, example="yes"),
}

DMARC_KEYS = {
    "enforce": Key(
        Bool(), "no",
        doc="Act on the domain's policy: `p=reject` is refused and `p=quarantine` gets "
        "`quarantine_action`.  With `no` the result is only recorded.",
        example="yes",
    ),
    "quarantine_action": Key(
        Choice(("quarantine", "tag")), "quarantine",
        doc="What `p=quarantine` does when `enforce = yes`: `quarantine` holds the message, "
        "`tag` delivers it marked as failing DMARC.",
        example="tag",
    ),
    "tempfail_on_error": Key(
        Bool(), "no",
        doc="Answer with a temporary error when the DMARC record cannot be looked up, instead of "
        "accepting the mail unchecked.",
        example="yes",
    ),
    "check_internal": Key(Bool(), "no", doc=_TRUSTED, example="yes"),
}

ATTACHMENTS_KEYS = {
    "blocked_extensions": Key(
        ExtensionList(), ", ".join(DEFAULT_BLOCKED_EXTENSIONS),
        default_doc="a list of %d (`%s`)"
        % (len(DEFAULT_BLOCKED_EXTENSIONS), ", ".join(DEFAULT_BLOCKED_EXTENSIONS)),
        doc="Attachments whose file name ends in one of these are blocked.  Lower-cased, a "
        "leading dot dropped (`.EXE` is `exe`); letters, digits, `_`, `+` and `-`.  `none` or an "
        "empty value blocks no extension (the extension `none` itself is written `.none`).  The "
        "value replaces the whole default list: to extend it, copy the line `mailgate "
        "check-config` prints and add to it.",
        example="exe, js, vbs, 7z",
    ),
    "blocked_mime_types": Key(
        MimeTypeList(), "",
        doc="Parts whose `Content-Type` is one of these are blocked; `type/*` is every subtype "
        "of type.  Lower-cased.",
        example="application/x-msdownload, application/java-archive",
    ),
    "detect_executables": Key(
        Bool(), "yes",
        doc="Also recognise executable files by their content, whatever they are called.",
        example="no",
    ),
    "action": Key(
        Choice(("reject", "quarantine", "strip")), "reject",
        doc="What happens to a message with a blocked attachment: `reject` refuses it during the "
        "SMTP session, `quarantine` accepts and holds it, `strip` removes the attachment and "
        "delivers the rest.",
        example="quarantine",
    ),
    "max_archive_depth": Key(
        Int(0, 10), "3",
        doc="How many archives deep (an archive inside an archive) to look; an attached archive "
        "is level 1 and a `.tar.gz` counts as one level.",
        example="2",
    ),
    "max_archive_members": Key(
        Int(1), "1000",
        doc="Archive members in the whole message at most (all archives together: that bounds "
        "the work).",
        example="200",
    ),
    "max_expanded_size": Key(
        Size(), "100M",
        doc="The total size an archive may unpack to (the zip bomb guard).",
        example="50M",
    ),
    "max_compression_ratio": Key(
        Int(2), "100",
        doc="The largest ratio of unpacked to packed size of an archive member, checked once a "
        "member has unpacked past 1 MiB (small repetitive files pass).",
        example="50",
    ),
    "encrypted_archives": Key(
        Choice(("allow", "reject")), "reject",
        doc="Password-protected archives, which cannot be looked into.",
        example="allow",
    ),
    "max_mime_depth": Key(
        Int(1), "20", doc="How deeply MIME parts may nest.", example="10"
    ),
    "max_parts": Key(Int(1), "500", doc="MIME parts in one message at most.", example="100"),
    "malformed": Key(
        Choice(("reject", "accept")), "reject",
        doc="What happens to a message that cannot be fully checked: broken MIME, a broken "
        "archive, or over one of the limits above.",
        example="accept",
    ),
}

FILTERS = _plain("filters", FiltersConfig, FILTERS_KEYS)
SPF = _plain("spf", SPFConfig, SPF_KEYS)
DMARC = _plain("dmarc", DMARCConfig, DMARC_KEYS)
ATTACHMENTS = _plain("attachments", AttachmentsConfig, ATTACHMENTS_KEYS)
FILTER = Section(
    "filter_sections", {}, _build_filter_section, _flatten_filter_section, named=True,
    any_key=FILTER_OPTION,
)
