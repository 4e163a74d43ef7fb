"""
What a file is by its content, whatever it is called: sniff_executable (PE, ELF, Mach-O, Java,
DEX, LNK, CAB, CHM, OneNote, disk images and, for attachments, text scripts and shortcuts),
_OleScanner (VBA macros and Windows Installer packages in an OLE2 file, streamed) and
sniff_archive (which container to open: zip, gzip, bzip2, xz, tar, TNEF).

Separate because these are pure functions of the first bytes (HEAD_SIZE of them) of a file,
used on MIME parts, uuencoded blocks and archive members alike.
"""

import re
import struct

from mailgate.filters.mime.tnef import _TNEF_MAGIC

HEAD_SIZE = 64 * 1024  # what content sniffing looks at (PE headers, ISO 9660 at 32K, ...)

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_LNK_MAGIC = b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_MACHO = {
    b"\xfe\xed\xfa\xce": "Mach-O executable", b"\xce\xfa\xed\xfe": "Mach-O executable",
    b"\xfe\xed\xfa\xcf": "Mach-O executable", b"\xcf\xfa\xed\xfe": "Mach-O executable",
    b"\xca\xfe\xba\xbf": "Mach-O universal binary", b"\xbe\xba\xfe\xca": "Mach-O universal binary",
    b"\xbf\xba\xfe\xca": "Mach-O universal binary",
}
_ONENOTE_MAGIC = bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3")
_MSI_CLSIDS = {
    bytes.fromhex("84100c0000000000c000000000000046"): "Windows Installer package",
    bytes.fromhex("86100c0000000000c000000000000046"): "Windows Installer patch",
    bytes.fromhex("82100c0000000000c000000000000046"): "Windows Installer transform",
}


def sniff_executable(head, attachment=True):
    """
    What executable or script head (the first bytes of a file) is, or None.  Binary formats are
    recognised by their magic; the text ones (scripts, HTA, shortcuts, registry files) only when
    attachment is true (an inline message body starting with "#!" is just text).
    """
    if head[:2] == b"MZ":
        if len(head) >= 0x40:
            offset = struct.unpack("<L", head[0x3C:0x40])[0]
            signature = head[offset:offset + 4]
            if signature == b"PE\0\0":
                return "Windows PE executable"
            if signature[:2] in (b"NE", b"LE", b"LX"):
                return "Windows/OS2 %s executable" % signature[:2].decode()
        if b"\0" in head[2:64]:  # a binary DOS header, not text that happens to start "MZ"
            return "DOS executable"
    if head[:4] == b"\x7fELF":
        return "ELF executable"
    if head[:4] in _MACHO:
        return _MACHO[head[:4]]
    if head[:4] == b"\xca\xfe\xba\xbe" and len(head) >= 8:
        # Java classes and fat Mach-O share the magic: a class has a major version >= 45 here,
        # a fat binary its (small) number of architectures.
        if struct.unpack(">L", head[4:8])[0] < 45:
            return "Mach-O universal binary"
        return "Java class file"
    if head[:4] == b"dex\n" and head[7:8] == b"\0":
        return "Android DEX executable"
    if head[:20] == _LNK_MAGIC:
        return "Windows shortcut (LNK)"
    if head[:8] == b"MSCF\0\0\0\0":
        return "Windows cabinet (CAB)"
    if head[:8] == b"ITSF\x03\x00\x00\x00":
        return "compiled HTML help (CHM)"
    if head[:16] == _ONENOTE_MAGIC:
        return "OneNote section"
    if head[:8] == b"vhdxfile" or head[:8] == b"conectix":
        return "virtual disk image"
    for offset in (0x8001, 0x8801, 0x9001):
        if head[offset:offset + 5] in (b"CD001", b"BEA01", b"NSR02", b"NSR03"):
            return "disk image (ISO 9660/UDF)"
    if attachment:
        return _sniff_text(head)
    return None


def _sniff_text(head):
    if head.startswith(b"\xef\xbb\xbf"):
        text = head[3:].decode("utf-8", "replace")
    elif head.startswith(b"\xff\xfe"):
        text = head[2:len(head) & ~1].decode("utf-16-le", "replace")
    elif head.startswith(b"\xfe\xff"):
        text = head[2:len(head) & ~1].decode("utf-16-be", "replace")
    else:
        text = head.decode("latin-1")
    if text.startswith("#!"):
        return "script (#! line)"
    lead = text.lstrip().lower()
    if lead.startswith("[internetshortcut]"):
        return "Internet shortcut"
    if lead.startswith("[shell]") and "command=" in lead:
        return "Windows Explorer command file"
    if lead.startswith("regedit4") or lead.startswith("windows registry editor version"):
        return "Windows registry file"
    if "<hta:application" in lead:
        return "HTML application (HTA)"
    return None


class _OleScanner:
    """
    Finds VBA macros (a "_VBA_PROJECT" stream or "_VBA_PROJECT_CUR" storage) and Windows
    Installer packages (the root entry's CLSID) in an OLE2 compound file, streamed: directory
    entries are 128-byte records aligned to 128 bytes after the header, so candidates are found
    with a byte search and confirmed by their alignment, name length and type, without following
    the FAT.  (Word's "Macros" storage also holds a _VBA_PROJECT stream.)
    """

    _VBA = "_vba_project".encode("utf-16-le")
    _ROOT = "root entry".encode("utf-16-le")

    def __init__(self):
        self.base = 0  # stream offset of self.pending[0], a multiple of 128
        self.pending = b""
        self.found = None

    def feed(self, data):
        if self.found is not None:
            return
        buf = self.pending + data
        usable = len(buf) - len(buf) % 128
        block, self.pending = buf[:usable], buf[usable:]
        if block:
            self._scan(block)
        self.base += usable

    def _scan(self, block):
        lower = block.lower()
        for pattern, check in ((self._VBA, self._vba), (self._ROOT, self._root)):
            at = lower.find(pattern)
            while at >= 0 and self.found is None:
                if (self.base + at) % 128 == 0 and self.base + at >= 512:
                    record = block[at:at + 128]
                    if len(record) == 128:
                        check(record)
                at = lower.find(pattern, at + 1)

    def _vba(self, record):
        length = struct.unpack("<H", record[64:66])[0]
        if length in (26, 34) and record[66] in (1, 2):
            self.found = "document with VBA macros"

    def _root(self, record):
        if struct.unpack("<H", record[64:66])[0] == 22 and record[66] == 5:
            kind = _MSI_CLSIDS.get(record[80:96])
            if kind:
                self.found = kind


def sniff_archive(head):
    """'zip', 'gzip', 'bzip2', 'xz', 'tar', 'tnef' or None, from the first bytes."""
    if head[:4] == _TNEF_MAGIC:
        return "tnef"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:8] == b"PK\x07\x08PK\x03\x04":
        return "zip"
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if re.match(rb"BZh[1-9](?:1AY&SY|\x17\x72\x45\x38\x50\x90)", head[:10]):
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if _is_tar_header(head[:512]):
        return "tar"
    return None


def _is_tar_header(block):
    if len(block) < 512 or block[:1] == b"\0":
        return False
    if block[257:262] == b"ustar":
        return True
    # Old (v7) archives have no magic: trust a matching header checksum.
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    return stored == computed
