"""
The values of the attachment policy: Policy (an AttachmentsConfig normalised for checking, by
policy_from_config) and what inspect() returns, a Report and the Findings in it.

Separate because they are the vocabulary shared by the walk and the attachment filter, and they
depend on nothing else in the package.
"""

import attr


@attr.s(frozen=True, slots=True)
class Finding:
    """
    One blocked attachment.  path is the MIME part to remove (child indexes from the root, () for
    the root itself); name what to show ("invoice.exe", "files.zip: bin/setup.exe" for a member,
    "unnamed part 2" for a part without a name), printable; reason why ("blocked file type .exe").
    """

    path = attr.ib()
    name = attr.ib()
    reason = attr.ib()


@attr.s(slots=True)
class Report:
    blocked = attr.ib(factory=list)  # Finding, in message order, at most one per MIME part
    malformed = attr.ib(factory=list)  # str, in message order
    parts = attr.ib(default=0)  # MIME parts walked
    members = attr.ib(default=0)  # archive members looked at
    expanded = attr.ib(default=0)  # bytes produced by decompression
    errors = attr.ib(factory=list)  # (where, exception) for unexpected failures, for the log


@attr.s(frozen=True, slots=True)
class Policy:
    """AttachmentsConfig normalised for checking (see policy_from_config)."""

    extensions = attr.ib(default=())  # lower-case, no leading dot
    mime_types = attr.ib(default=())  # lower-case "type/subtype" or "type/*"
    detect_executables = attr.ib(default=True)
    max_archive_depth = attr.ib(default=3)
    max_archive_members = attr.ib(default=1000)
    max_expanded_size = attr.ib(default=100 * 1024 * 1024)
    max_compression_ratio = attr.ib(default=100)
    reject_encrypted = attr.ib(default=True)
    max_mime_depth = attr.ib(default=20)
    max_parts = attr.ib(default=500)
    stop_at_limits = attr.ib(default=True)  # malformed = reject: no point walking past a limit


def policy_from_config(config):
    """A Policy from a mailgate.config.AttachmentsConfig."""
    extensions = []
    for ext in config.blocked_extensions:
        ext = str(ext).strip().lstrip(".").casefold()
        if ext and ext not in extensions:
            extensions.append(ext)
    return Policy(
        extensions=tuple(extensions),
        mime_types=tuple(str(t).strip().lower() for t in config.blocked_mime_types
                         if str(t).strip()),
        detect_executables=bool(config.detect_executables),
        max_archive_depth=int(config.max_archive_depth),
        max_archive_members=int(config.max_archive_members),
        max_expanded_size=int(config.max_expanded_size),
        max_compression_ratio=float(config.max_compression_ratio),
        reject_encrypted=config.encrypted_archives != "allow",
        max_mime_depth=int(config.max_mime_depth),
        max_parts=int(config.max_parts),
        stop_at_limits=config.malformed == "reject",
    )
