"""
Archives, opened by content and read as streams: _Inspector.examine checks one file (a MIME
part's bytes or an archive member) with the sniffers and opens the zip, tar, gzip, bzip2, xz
and TNEF containers it finds, metering every byte decompressed against max_expanded_size and
max_compression_ratio, counting members against max_archive_members and nesting against
max_archive_depth; _Blocked and _Corrupt are how it reports.  The zip helpers count a central
directory before zipfile reads it and list every name a member claims.

Separate because it is the only part that decompresses and the only part with resource limits
to enforce; it uses the name checks and the sniffers and knows nothing of MIME.
"""

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import tempfile
import zipfile
import zlib

from mailgate.filters.mime.names import _fix_surrogates, display_name, name_problem
from mailgate.filters.mime.sniff import (
    _OLE_MAGIC,
    HEAD_SIZE,
    _OleScanner,
    sniff_archive,
    sniff_executable,
)
from mailgate.filters.mime.tnef import tnef_attachments

CHUNK = 64 * 1024  # read size when streaming a member
RATIO_FLOOR = 1024 * 1024  # max_compression_ratio applies to members expanding past 1 MiB
SPOOL_MEMORY = 4 * 1024 * 1024  # a nested zip bigger than this goes to a temporary file


def _gzip_name(head):
    """The original file name stored in a gzip header (FNAME), or None."""
    if len(head) < 10 or not head[3] & 0x08:
        return None
    pos = 10
    if head[3] & 0x04:  # FEXTRA
        if len(head) < 12:
            return None
        pos += 2 + struct.unpack("<H", head[10:12])[0]
    end = head.find(b"\0", pos)
    if end < 0:
        return None
    return head[pos:end].decode("latin-1") or None


class _Blocked(Exception):
    def __init__(self, label, reason):
        Exception.__init__(self, label, reason)
        self.label = label
        self.reason = reason


class _Corrupt(Exception):
    def __init__(self, label, reason):
        Exception.__init__(self, label, reason)
        self.label = label
        self.reason = reason


class _NotZip(Exception):
    pass


# What a damaged archive or compressed stream may raise from the standard library.
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, lzma.LZMAError, zlib.error,
           OSError, EOFError, ValueError, struct.error, UnicodeError, KeyError, IndexError,
           OverflowError)


class _Source:
    """The bytes of one file, read once, front to back; head is the first HEAD_SIZE of them."""

    def __init__(self, read, whole=None):
        self._read = read
        self.whole = whole  # all the bytes, when they are in memory anyway (a MIME part)
        pieces = []
        size = 0
        while size < HEAD_SIZE:
            piece = read(HEAD_SIZE - size)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        self.head = b"".join(pieces)
        self._pos = 0

    @classmethod
    def of_bytes(cls, data):
        return cls(io.BytesIO(data).read, whole=data)

    def read(self, n=-1):
        if n is None or n < 0:
            n = CHUNK
        if self._pos < len(self.head):
            out = self.head[self._pos:self._pos + n]
            self._pos += len(out)
            return out
        return self._read(n)

    def readable(self):
        return True

    def drain(self, feed=None):
        while True:
            chunk = self.read(CHUNK)
            if not chunk:
                return
            if feed is not None:
                feed(chunk)


class _Counting:
    """A file object counting the bytes read through it (the compressed side of a stream)."""

    def __init__(self, source):
        self.source = source
        self.count = 0

    def read(self, n=-1):
        data = self.source.read(n)
        self.count += len(data)
        return data

    def readable(self):
        return True


class _Inspector:
    def __init__(self, policy, report):
        self.policy = policy
        self.report = report

    # -- the meters --------------------------------------------------------------------------

    def _spend(self, n, label):
        self.report.expanded += n
        if self.report.expanded > self.policy.max_expanded_size:
            raise _Blocked(label, "expanded size exceeds max_expanded_size (%d bytes)"
                           % self.policy.max_expanded_size)

    def _metered(self, read, label, compressed):
        """read(n) of a decompressing stream, charged to the budget; compressed() says how many
        compressed bytes have been consumed so far (for the ratio)."""
        produced = [0]
        ratio = self.policy.max_compression_ratio

        def metered(n):
            data = read(min(n if n is not None and n >= 0 else CHUNK, CHUNK))
            produced[0] += len(data)
            self._spend(len(data), label)
            if produced[0] > RATIO_FLOOR and produced[0] > ratio * max(compressed(), 1):
                raise _Blocked(label, "compression ratio exceeds max_compression_ratio (%g)"
                               % ratio)
            return data

        return metered

    def _count_members(self, n, label):
        self.report.members += n
        if self.report.members > self.policy.max_archive_members:
            raise _Blocked(label, "more than max_archive_members (%d) archive members"
                           % self.policy.max_archive_members)

    def _check_member_name(self, names, label):
        for name in names:
            if name:
                reason = name_problem(name, self.policy)
                if reason:
                    raise _Blocked(label, reason)

    # -- content -----------------------------------------------------------------------------

    def examine(self, source, label, level, attachment=True):
        """
        Check the content of one file (a MIME part's decoded bytes or an archive member) found
        inside level archives; raises _Blocked or _Corrupt.
        """
        head = source.head
        if self.policy.detect_executables:
            kind = sniff_executable(head, attachment)
            if kind:
                raise _Blocked(label, "executable content (%s)" % kind)
        kind = sniff_archive(head)
        if kind is not None:
            self._check_depth(label, level)
            getattr(self, "_" + kind)(source, label, level + 1)
            return
        if source.whole is not None and self._trailing_zip(source.whole):
            # A zip with something in front of it (a "polyglot", which 7-Zip opens whatever its
            # name).  Not being one after all is no fault of the file's.
            self._check_depth(label, level)
            try:
                self._zip(source, label, level + 1)
                return
            except _Corrupt:
                pass
        scanner = None
        if self.policy.detect_executables and head[:8] == _OLE_MAGIC:
            scanner = _OleScanner()
            if source.whole is not None:
                scanner.feed(source.whole)
            else:
                source.drain(scanner.feed)
            if scanner.found:
                raise _Blocked(label, "executable content (%s)" % scanner.found)
        if source.whole is None:
            source.drain()  # every byte of a member is metered (bombs with lying headers)

    def _check_depth(self, label, level):
        if level + 1 > self.policy.max_archive_depth:
            raise _Blocked(label, "archive nested deeper than max_archive_depth (%d)"
                           % self.policy.max_archive_depth)

    def _trailing_zip(self, data):
        tail = data[-(65536 + 22):]
        if b"PK\x05\x06" not in tail or b"PK\x01\x02" not in data:
            return False
        try:
            return _zip_entry_count(io.BytesIO(data), 1) > 0
        except (_NotZip,) + _DAMAGE:
            return False

    # -- zip ---------------------------------------------------------------------------------

    def _zip(self, source, label, level):
        if source.whole is not None:
            self._zip_file(io.BytesIO(source.whole), label, level)
            return
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
            source.drain(spool.write)
            spool.seek(0)
            self._zip_file(spool, label, level)

    def _zip_file(self, fileobj, label, level):
        policy = self.policy
        try:
            count = _zip_entry_count(fileobj, policy.max_archive_members + 1)
        except (_NotZip,) + _DAMAGE as e:
            raise _Corrupt(label, "corrupt zip archive (%s)" % _why(e))
        if self.report.members + count > policy.max_archive_members:
            raise _Blocked(label, "more than max_archive_members (%d) archive members"
                           % policy.max_archive_members)
        try:
            fileobj.seek(0)
            archive = zipfile.ZipFile(fileobj)
        except _DAMAGE + (NotImplementedError, RuntimeError) as e:
            raise _Corrupt(label, "corrupt zip archive (%s)" % _why(e))
        with archive:
            infos = archive.infolist()
            if len(infos) > count:  # never: the same directory was counted
                raise _Blocked(label, "more than max_archive_members (%d) archive members"
                               % policy.max_archive_members)
            declared = sum(info.file_size for info in infos if not info.flag_bits & 1)
            if self.report.expanded + declared > policy.max_expanded_size:
                raise _Blocked(label, "declared expanded size exceeds max_expanded_size (%d bytes)"
                               % policy.max_expanded_size)
            if policy.detect_executables:
                kind = _zip_package_kind(infos)
                if kind:
                    raise _Blocked(label, "executable content (%s)" % kind)
            for info in infos:
                self._zip_member(archive, info, label, level)

    def _zip_member(self, archive, info, label, level):
        policy = self.policy
        names = _zip_member_names(info)
        member = "%s: %s" % (label, display_name(names[0]))
        self._count_members(1, label)
        if info.is_dir():
            return
        self._check_member_name(names, member)
        if info.flag_bits & 1:
            if policy.reject_encrypted:
                raise _Blocked(member, "encrypted archive member")
            return  # allowed: only its name could be checked
        ratio = policy.max_compression_ratio
        if info.file_size > RATIO_FLOOR and info.file_size > ratio * max(info.compress_size, 1):
            raise _Blocked(member, "compression ratio exceeds max_compression_ratio (%g)" % ratio)
        try:
            stream = archive.open(info)
        except NotImplementedError as e:
            raise _Blocked(member, "cannot be inspected (%s)" % _why(e))
        except _DAMAGE + (RuntimeError,) as e:
            raise _Corrupt(label, "corrupt zip archive (%s)" % _why(e))
        with stream:
            try:
                read = self._metered(stream.read, member, lambda: info.compress_size)
                self.examine(_Source(read), member, level)
            except _DAMAGE as e:  # from this zip's stream (nested archives report their own)
                raise _Corrupt(label, "corrupt zip archive (%s)" % _why(e))

    # -- tar ---------------------------------------------------------------------------------

    def _tar(self, source, label, level):
        try:
            archive = tarfile.open(fileobj=source, mode="r|")
        except _DAMAGE as e:
            raise _Corrupt(label, "corrupt tar archive (%s)" % _why(e))
        try:
            while True:
                try:
                    info = archive.next()
                except _DAMAGE as e:
                    raise _Corrupt(label, "corrupt tar archive (%s)" % _why(e))
                if info is None:
                    return
                archive.members = []  # stream mode needs no index; keep memory flat
                self._count_members(1, label)
                name = _fix_surrogates(info.name)
                member = "%s: %s" % (label, display_name(name))
                if info.isdir() or not (info.isfile() or info.issym() or info.islnk()):
                    continue
                self._check_member_name([name], member)
                if not info.isfile():
                    continue
                try:
                    stream = archive.extractfile(info)
                except _DAMAGE as e:
                    raise _Corrupt(label, "corrupt tar archive (%s)" % _why(e))
                read = stream.read
                if info.issparse():  # holes expand from nothing: meter them like decompression
                    read = self._metered(stream.read, member, lambda: max(info.size, 1))
                try:
                    self.examine(_Source(read), member, level)
                except (tarfile.TarError, EOFError) as e:
                    raise _Corrupt(label, "corrupt tar archive (%s)" % _why(e))
        finally:
            archive.close()

    # -- TNEF (winmail.dat: Outlook shows what is inside as attachments) --------------------

    def _tnef(self, source, label, level):
        data = source.whole
        if data is None:  # inside another archive: its bytes were metered as they were read
            data = b"".join(iter(lambda: source.read(CHUNK), b""))
        try:
            found = tnef_attachments(data)
        except (ValueError, struct.error, IndexError) as e:
            raise _Corrupt(label, "corrupt TNEF (%s)" % _why(e))
        self._count_members(len(found), label)
        for i, (names, content) in enumerate(found):
            names = [_fix_surrogates(name) for name in names if name.strip()]
            shown = display_name(names[0]) if names else "attachment %d" % (i + 1)
            member = "%s: %s" % (label, shown)
            self._check_member_name(names, member)
            if content is not None:
                self.examine(_Source.of_bytes(content), member, level)

    # -- single-stream compressors -----------------------------------------------------------

    def _gzip(self, source, label, level):
        self._compressed(source, label, level, "gzip",
                         lambda f: gzip.GzipFile(fileobj=f, mode="rb"), _gzip_name(source.head))

    def _bzip2(self, source, label, level):
        self._compressed(source, label, level, "bzip2", lambda f: bz2.BZ2File(f, "rb"), None)

    def _xz(self, source, label, level):
        self._compressed(source, label, level, "xz",
                         lambda f: lzma.LZMAFile(f, "rb", format=lzma.FORMAT_XZ), None)

    def _compressed(self, source, label, level, kind, opener, stored_name):
        counting = _Counting(source)
        try:
            stream = opener(counting)
            inner = _Source(self._metered(stream.read, label, lambda: counting.count))
            if sniff_archive(inner.head) == "tar":
                self._tar(inner, label, level)  # .tar.gz and friends: one level
                return
            self._count_members(1, label)
            name = stored_name or _uncompressed_name(label, kind)
            member = "%s: %s" % (label, display_name(name))
            self._check_member_name([name], member)
            self.examine(inner, member, level)
        except (_Blocked, _Corrupt):
            raise
        except _DAMAGE as e:
            raise _Corrupt(label, "corrupt %s stream (%s)" % (kind, _why(e)))


def _why(exception):
    text = str(exception) or type(exception).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def _uncompressed_name(label, kind):
    last = label.rsplit(": ", 1)[-1]
    lower = last.lower()
    for suffix, replacement in ((".tgz", ".tar"), (".gz", ""), (".bz2", ""), (".xz", ""),
                                (".tbz2", ".tar"), (".txz", ".tar")):
        if lower.endswith(suffix) and len(last) > len(suffix):
            return last[:-len(suffix)] + replacement
    return "(%s content)" % kind


def _zip_member_names(info):
    names = [_fix_surrogates(info.filename)]
    if not info.flag_bits & 0x800:
        # Decoded as cp437 by zipfile; a tool that guesses UTF-8 would see something else.
        try:
            utf8 = info.filename.encode("cp437").decode("utf-8")
        except (UnicodeError, ValueError):
            utf8 = None
        if utf8 and utf8 not in names:
            names.append(utf8)
    extra = info.extra or b""
    pos = 0
    while pos + 4 <= len(extra):
        kind, size = struct.unpack("<HH", extra[pos:pos + 4])
        data = extra[pos + 4:pos + 4 + size]
        if kind == 0x7075 and len(data) > 5 and data[0] == 1:  # Info-ZIP Unicode Path
            unicode_name = data[5:].decode("utf-8", "replace")
            if unicode_name not in names:
                names.append(unicode_name)
        pos += 4 + size
    return names


def _zip_package_kind(infos):
    """A zip that is an executable package by its layout: a Java archive, an APK, an AppX."""
    names = {info.filename.replace("\\", "/").lower() for info in infos}
    if "meta-inf/manifest.mf" in names and any(n.endswith(".class") for n in names):
        return "Java archive"
    if "androidmanifest.xml" in names and "classes.dex" in names:
        return "Android package"
    if "appxmanifest.xml" in names or "appxmetadata/appxbundlemanifest.xml" in names:
        return "Windows app package"
    return None


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")


def _zip_entry_count(fp, limit):
    """
    The number of central directory entries zipfile.ZipFile would read (found the same way), but
    counting at most limit of them: ZipFile builds an object per entry before anything can be
    checked.  Raises _NotZip when there is no end of central directory record.
    """
    fp.seek(0, 2)
    size = fp.tell()
    if size < _EOCD.size:
        raise _NotZip("too short")
    fp.seek(size - _EOCD.size)
    record = fp.read(_EOCD.size)
    if record[:4] == b"PK\x05\x06" and record[-2:] == b"\0\0":
        location = size - _EOCD.size
    else:
        start = max(size - 65536 - _EOCD.size, 0)
        fp.seek(start)
        tail = fp.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            raise _NotZip("no end of central directory")
        record = tail[at:at + _EOCD.size]
        location = start + at
    fields = _EOCD.unpack(record)
    cd_size, cd_offset = fields[5], fields[6]
    concat = location - cd_size - cd_offset
    if location >= _EOCD64_LOCATOR.size:
        fp.seek(location - _EOCD64_LOCATOR.size)
        locator = fp.read(_EOCD64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07" and location >= _EOCD64_LOCATOR.size + _EOCD64.size:
            fp.seek(location - _EOCD64_LOCATOR.size - _EOCD64.size)
            record64 = fp.read(_EOCD64.size)
            if record64[:4] == b"PK\x06\x06":
                fields64 = _EOCD64.unpack(record64)
                cd_size, cd_offset = fields64[8], fields64[9]
                concat = location - cd_size - cd_offset - _EOCD64_LOCATOR.size - _EOCD64.size
    start = cd_offset + concat
    if start < 0 or start > size:
        raise _NotZip("bad central directory offset")
    fp.seek(start)
    count = 0
    total = 0
    while total < cd_size and count < limit:
        header = fp.read(_CENTRAL.size)
        if len(header) != _CENTRAL.size or header[:4] != b"PK\x01\x02":
            break  # ZipFile will call it corrupt
        fields = _CENTRAL.unpack(header)
        skip = fields[12] + fields[13] + fields[14]
        fp.seek(skip, 1)
        total += _CENTRAL.size + skip
        count += 1
    return count
