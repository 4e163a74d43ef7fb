"""
TNEF (winmail.dat, which Outlook shows as the attachments inside it): tnef_attachments reads
the attachments' names and content from the stream and its MAPI property lists.

Separate because it is a self-contained binary format parser; the archive inspector uses it to
open TNEF like any other container, and sniff_archive uses its signature.
"""

import struct

_TNEF_MAGIC = b"\x78\x9f\x3e\x22"
_TNEF_ATTACH_RENDDATA = 0x00069002
_TNEF_ATTACH_TITLE = 0x00018010
_TNEF_ATTACH_DATA = 0x0006800F
_TNEF_ATTACHMENT = 0x00069005  # the attachment's MAPI properties
_MAPI_FIXED = {0x0001: 0, 0x0002: 2, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8,
               0x000A: 4, 0x000B: 2, 0x0014: 8, 0x0040: 8, 0x0048: 16}
_MAPI_STRING8, _MAPI_UNICODE, _MAPI_BINARY, _MAPI_OBJECT = 0x001E, 0x001F, 0x0102, 0x000D
# PR_ATTACH_LONG_FILENAME, PR_ATTACH_FILENAME, PR_DISPLAY_NAME, PR_ATTACH_EXTENSION,
# PR_ATTACH_LONG_PATHNAME, PR_ATTACH_PATHNAME
_MAPI_NAMES = (0x3707, 0x3704, 0x3001, 0x3703, 0x370D, 0x3708)
_MAPI_ATTACH_DATA = 0x3701


class _Reader:
    """Little-endian reads from bytes that raise ValueError instead of running past the end."""

    def __init__(self, data, pos=0):
        self.data = data
        self.pos = pos

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated at offset %d" % self.pos)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self):
        return struct.unpack("<H", self.take(2))[0]

    def u32(self):
        return struct.unpack("<L", self.take(4))[0]

    def padded(self, n):
        out = self.take(n)
        self.take(-n % 4)
        return out


def tnef_attachments(data):
    """
    The attachments of a TNEF stream (winmail.dat): a list of (names, content or None).  Names
    come from attAttachTitle and the attachment's MAPI properties (long file name, file name,
    display name, extension), content from attAttachData or PR_ATTACH_DATA_OBJ (an embedded
    message or OLE storage there is returned as such: it is examined like any file).  Raises
    ValueError when the stream is damaged.
    """
    reader = _Reader(data)
    if reader.take(4) != _TNEF_MAGIC:
        raise ValueError("no TNEF signature")
    reader.u16()  # legacy key
    attachments = []
    current = None
    while reader.pos < len(data):
        level = reader.take(1)[0]
        attribute = reader.u32()
        value = reader.take(reader.u32())
        reader.u16()  # checksum
        if level != 2:
            continue
        if current is None or attribute == _TNEF_ATTACH_RENDDATA:
            current = ([], [None])
            attachments.append(current)
        names, content = current
        if attribute == _TNEF_ATTACH_TITLE:
            names.append(value.split(b"\0", 1)[0].decode("cp1252", "replace"))
        elif attribute == _TNEF_ATTACH_DATA:
            content[0] = value
        elif attribute == _TNEF_ATTACHMENT:
            for prop, kind, values in _mapi_properties(value):
                if prop in _MAPI_NAMES and kind in (_MAPI_STRING8, _MAPI_UNICODE):
                    for raw in values:
                        text = raw.decode("utf-16-le" if kind == _MAPI_UNICODE else "cp1252",
                                          "replace")
                        names.append(text.split("\0", 1)[0])
                elif prop == _MAPI_ATTACH_DATA and values and content[0] is None:
                    content[0] = values[0][16:] if kind == _MAPI_OBJECT else values[0]
    return [(names, content[0]) for names, content in attachments]


def _mapi_properties(data):
    """(property id, type, [values as bytes]) for a TNEF-encoded MAPI property list."""
    reader = _Reader(data)
    count = reader.u32()
    if count > len(data) // 4:
        raise ValueError("impossible MAPI property count %d" % count)
    out = []
    for _ in range(count):
        kind = reader.u16()
        prop = reader.u16()
        if prop >= 0x8000:  # a named property: GUID, then an id or a name
            reader.take(16)
            if reader.u32() == 0:
                reader.u32()
            else:
                reader.padded(reader.u32())
        base = kind & 0x0FFF
        if base in (_MAPI_STRING8, _MAPI_UNICODE, _MAPI_BINARY, _MAPI_OBJECT):
            values = [reader.padded(reader.u32()) for _ in range(_mapi_count(reader, data))]
        elif base in _MAPI_FIXED:
            n = _mapi_count(reader, data) if kind & 0x1000 else 1
            values = [reader.padded(_MAPI_FIXED[base]) for _ in range(n)]
        else:
            raise ValueError("unknown MAPI property type 0x%04x" % kind)
        out.append((prop, base, values))
    return out


def _mapi_count(reader, data):
    n = reader.u32()
    if n > len(data) // 4:
        raise ValueError("impossible MAPI value count %d" % n)
    return n
