"""
What the attachment policy looks at: every MIME part of a message, the file names it claims, its
content, and the members of the archives it holds.  inspect() returns a Report: the blocked
attachments (Findings naming the MIME part, the file and why) and the structural problems
("malformed"); the filter (mailgate.filters.attachments) chooses the verdict, strip() rewrites.

Everything here is synchronous, CPU-bound and pure (the parsed message is only read, never
changed): the filter runs it in a thread.  No input may crash it or make it use unbounded memory
or time:

  * the MIME tree is walked with an explicit stack (no recursion), parts and depth counted; with
    malformed = reject the walk stops at the first limit exceeded, with accept it goes on;
  * archives are read as streams: every byte produced by decompression is metered against the
    message-wide max_expanded_size and each member's max_compression_ratio (judged once a member
    has expanded past RATIO_FLOOR, so small, very repetitive files pass), so a bomb is stopped at
    most a chunk past a limit; declared sizes (zip) are checked before anything is expanded;
  * archive members are counted across the whole message (max_archive_members), and a zip's
    central directory is counted before zipfile builds an object per entry;
  * archive nesting is bounded by max_archive_depth: a MIME attachment that is an archive is
    level 1.  A compressed tar (.tar.gz, .tar.bz2, .tar.xz) is one level; every other container
    (zip, tar, gzip, bzip2, xz, TNEF) one level each;
  * nested zips, which need random access, are spooled to a temporary file past 4 MiB.

Names: Content-Disposition filename and Content-Type name, every reading of them (see
part_names), and for archive members the stored name (and its UTF-8 reading, and the Info-ZIP
Unicode Path).  Direction overrides/embeddings/isolates and other invisible format characters
(not the joiners ZWNJ/ZWJ nor the marks LRM/RLM/ALM) and control characters block by themselves;
the extension is checked on the name without them, NFKC-normalised, trailing dots and spaces
dropped, case-folded, on its last path component (and before a ":" stream name).

Content (detect_executables), by magic, whatever the name: PE (and NE/LE/LX, and binary DOS "MZ"
headers), ELF, Mach-O (32/64-bit, both byte orders, universal), Java classes and archives (a zip
with META-INF/MANIFEST.MF and classes), Android DEX/APK, AppX/MSIX packages, Windows shortcuts
(LNK), OLE2 files holding a VBA project (.doc/.xls/.ppt with macros, and the vbaProject.bin of a
macro-enabled OOXML document whatever it is called) or that are Windows Installer packages,
patches or transforms, CAB, CHM, OneNote, ISO 9660/UDF, VHDX and dynamic VHD images; and for
attachments
(not inline text bodies): #! scripts, HTA, Internet shortcuts, Explorer command files, registry
files.  Plain-text scripts without a #! line (.js, .vbs, .ps1, .bat) are caught by name only.

Archives are opened by content: zip (also behind other data), tar, gzip, bzip2, xz and TNEF
(winmail.dat).  Others (7z, RAR, ...) are not opened.  An archive the standard library cannot
read is reported as malformed ("corrupt"); an encrypted zip member is blocked unless
encrypted_archives = allow, and a member compressed with a method zipfile lacks is blocked
("cannot be inspected").

The package: this namespace is its API (policy_from_config, inspect, strip, Finding, Report,
Policy; decode_payload, CHUNK and RATIO_FLOOR for the tests).  policy holds the values, names
the file-name readings and checks, sniff the content sniffers, tnef the winmail.dat reader,
archives the streaming archive inspector and its limits, decode the payload decoding, walker
the MIME walk, inspect() and strip().  The walker imports the detectors, never the reverse.
"""

from mailgate.filters.mime.archives import CHUNK, RATIO_FLOOR
from mailgate.filters.mime.decode import decode_payload
from mailgate.filters.mime.policy import Finding, Policy, Report, policy_from_config
from mailgate.filters.mime.walker import inspect, strip

__all__ = [
    "CHUNK",
    "RATIO_FLOOR",
    "Finding",
    "Policy",
    "Report",
    "decode_payload",
    "inspect",
    "policy_from_config",
    "strip",
]
