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
    "timeout": Key(Duration(), "30s"),
}


def _build_filter_section(name, values):
    return FilterSection(name=name, options=tuple(values.items()))


def _flatten_filter_section(section):
    return section.name, dict(section.options)


SPF_KEYS = {
    "reject_fail": Key(Bool(), "no"),
    "tempfail_on_error": Key(Bool(), "no"),
    "reject_permerror": Key(Bool(), "no"),
    "check_internal": Key(Bool(), "no"),
}

DMARC_KEYS = {
    "enforce": Key(Bool(), "no"),
    "quarantine_action": Key(Choice(("quarantine", "tag")), "quarantine"),
    "tempfail_on_error": Key(Bool(), "no"),
    "check_internal": Key(Bool(), "no"),
}

ATTACHMENTS_KEYS = {
    "blocked_extensions": Key(ExtensionList(), ", ".join(DEFAULT_BLOCKED_EXTENSIONS)),
    "blocked_mime_types": Key(MimeTypeList(), ""),
    "detect_executables": Key(Bool(), "yes"),
    "action": Key(Choice(("reject", "quarantine", "strip")), "reject"),
    "max_archive_depth": Key(Int(0, 10), "3"),
    "max_archive_members": Key(Int(1), "1000"),
    "max_expanded_size": Key(Size(), "100M"),
    "max_compression_ratio": Key(Int(2), "100"),
    "encrypted_archives": Key(Choice(("allow", "reject")), "reject"),
    "max_mime_depth": Key(Int(1), "20"),
    "max_parts": Key(Int(1), "500"),
    "malformed": Key(Choice(("reject", "accept")), "reject"),
}

FILTERS = _plain("filters", FiltersConfig, FILTERS_KEYS)
SPF = _plain("spf", SPFConfig, SPF_KEYS)
DMARC = _plain("dmarc", DMARCConfig, DMARC_KEYS)
ATTACHMENTS = _plain("attachments", AttachmentsConfig, ATTACHMENTS_KEYS)
FILTER = Section(
    "filter_sections", {}, _build_filter_section, _flatten_filter_section, named=True,
    any_keys=True,
)
