"""
The attachment policy filter: names, content, archives, limits and the three actions, on messages
built in memory by tests.attachment_corpus.
"""

import base64
import random
import zipfile
from email import policy as email_policy
from email.parser import BytesParser

import attr
import pytest
from twisted.internet import defer

from mailgate.filters import mime as mimewalk
from mailgate.filters.mime import walker as mime_walker
from mailgate.config import DEFAULT_BLOCKED_EXTENSIONS, AttachmentsConfig
from mailgate.filters import attachments
from mailgate.interfaces import IFilter
from tests import attachment_corpus as corpus
from tests.syncrun import Runner, result_of


def make_filter(**options):
    return attachments.AttachmentFilter(AttachmentsConfig(**options), Runner())


def verdict_for(raw, **options):
    return result_of(make_filter(**options).on_data(None, corpus.parse(raw)))


def report_for(raw, **options):
    policy = mimewalk.policy_from_config(AttachmentsConfig(**options))
    return mimewalk.inspect(corpus.parse(raw).parsed, policy)


def assert_blocked(verdict, name, reason_part=""):
    assert verdict.action == "reject", verdict
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    prefix = "Message rejected: attachment %s is not allowed (" % name
    assert verdict.reply.text.startswith(prefix), verdict.reply.text
    assert reason_part in verdict.reply.text, verdict.reply.text


def assert_malformed(verdict, problem_part=""):
    assert verdict.action == "reject", verdict
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.6.0")
    assert verdict.reply.text.startswith("Message structure rejected: "), verdict.reply.text
    assert problem_part in verdict.reply.text, verdict.reply.text


def assert_passes(verdict):
    assert verdict.action == "next", verdict
    assert verdict.message is None


# ---------------------------------------------------------------------------------------------
# The filter object.
# ---------------------------------------------------------------------------------------------


def test_make_builds_the_filter_from_the_context():
    @attr.s
    class Config:
        attachments = attr.ib()

    @attr.s
    class Context:
        config = attr.ib()
        reactor = attr.ib(default=None)
        resolver = attr.ib(default=None)
        run_in_thread = attr.ib(factory=Runner)

    context = Context(Config(AttachmentsConfig(action="quarantine")))
    f = attachments.make(context)
    assert f.name == "attachments"
    assert IFilter.providedBy(f)  # "any of the hooks": only on_data here
    verdict = result_of(f.on_data(None, corpus.parse(corpus.message_with(b"x", "a.exe"))))
    assert verdict.action == "quarantine"
    assert context.run_in_thread.calls == 1  # the walk ran in the thread


def test_clean_message_passes_untouched():
    raw = corpus.message(corpus.part(corpus.pdf(), "report.pdf", "application/pdf"),
                         corpus.part(corpus.png(), "photo.png", "image/png"),
                         corpus.part(corpus.docx(), "letter.docx", "application/vnd.openxmlformats-"
                                     "officedocument.wordprocessingml.document"),
                         corpus.part(corpus.ole_plain_doc(), "old.doc", "application/msword"),
                         corpus.part(b"a,b\r\n1,2\r\n", "data.csv", "text/csv"))
    assert_passes(verdict_for(raw))
    report = report_for(raw)
    assert report.blocked == [] and report.malformed == []
    assert report.members == 6  # the docx was opened: its XML and .rels members did not block


def test_message_without_attachments_passes():
    assert_passes(verdict_for(corpus.HEADERS + b"Content-Type: text/plain\r\n\r\nHello\r\n"))
    assert_passes(verdict_for(corpus.message()))


# ---------------------------------------------------------------------------------------------
# Names.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", DEFAULT_BLOCKED_EXTENSIONS)
def test_each_default_blocked_extension(ext):
    name = "file." + ext
    assert_blocked(verdict_for(corpus.message_with(b"harmless text", name)), name,
                   "blocked file type .%s)" % ext)


@pytest.mark.parametrize("name", ["INVOICE.EXE", "Invoice.Exe", "invoice.exe.", "invoice.exe. . ",
                                  "invoice.exe  ", "C:\\Users\\x\\invoice.exe", "../invoice.exe",
                                  "invoice.exe::$DATA", "ｉｎｖｏｉｃｅ．ｅｘｅ"])
def test_name_variants_are_caught(name):
    verdict = verdict_for(corpus.message_with(b"harmless", name))
    assert verdict.action == "reject" and "blocked file type .exe" in verdict.reply.text


def test_double_extension():
    assert_blocked(verdict_for(corpus.message_with(b"x", "invoice.pdf.exe")), "invoice.pdf.exe",
                   "blocked file type .exe (double extension .pdf.exe)")
    assert_passes(verdict_for(corpus.message_with(corpus.pdf(), "report.exe.pdf")))
    verdict = verdict_for(corpus.message_with(corpus.pdf(), "report.exe.pdf"),
                          blocked_extensions=("pdf",))
    assert_blocked(verdict, "report.exe.pdf", "blocked file type .pdf")


def test_right_to_left_override_is_an_attack():
    raw = corpus.message_with(b"harmless", "invoice\u202efdp.exe")
    assert_blocked(verdict_for(raw), "invoice\\u202efdp.exe", "U+202E")
    # Also when the rest of the name would pass: the override itself is the reason.
    assert_blocked(verdict_for(corpus.message_with(corpus.pdf(), "report\u202Efdp.pdf")),
                   "report\\u202efdp.pdf", "direction override character U+202E in file name")


@pytest.mark.parametrize("char", ["\u202a", "\u202b", "\u202d", "\u2066", "\u2067", "\u200b",
                                  "\ufeff", "\u2060", "\u00ad"])
def test_other_format_characters_block(char):
    verdict = verdict_for(corpus.message_with(corpus.pdf(), "report%s.pdf" % char))
    assert verdict.action == "reject" and "U+%04X" % ord(char) in verdict.reply.text


def test_joiners_and_marks_are_removed_but_allowed():
    # ZWNJ is ordinary in Persian names; RLM in Hebrew ones.  They cannot hide an extension.
    assert_passes(verdict_for(corpus.message_with(corpus.pdf(), "نامه\u200cها.pdf")))
    assert_passes(verdict_for(corpus.message_with(corpus.pdf(), "חשבון\u200f 2023.pdf")))
    verdict = verdict_for(corpus.message_with(b"x", "invoice.e\u200dxe"))
    assert verdict.action == "reject" and "blocked file type .exe" in verdict.reply.text


def test_control_characters_block():
    verdict = verdict_for(corpus.message(corpus.part(
        b"x", disposition=None, headers=["Content-Disposition: attachment; filename*=utf-8''evil"
                                         ".exe%00.pdf"])))
    assert verdict.action == "reject" and "control character U+0000" in verdict.reply.text


def test_encoded_word_names():
    for word in ("=?utf-8?b?%s?=" % base64.b64encode("счёт.exe".encode()).decode(),
                 "=?iso-8859-1?q?r=E9sum=E9=2Eexe?=",
                 "=?utf-8?q?invoice?= =?utf-8?q?=2Eexe?="):
        verdict = verdict_for(corpus.message(corpus.part(b"x", word)))
        assert verdict.action == "reject", word
        assert "blocked file type .exe" in verdict.reply.text
    verdict = verdict_for(corpus.message(corpus.part(b"x", "=?iso-8859-1?q?r=E9sum=E9.exe?=")))
    assert_blocked(verdict, "r\\xe9sum\\xe9.exe")
    assert_passes(verdict_for(corpus.message(corpus.part(corpus.pdf(),
                                                         "=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="))))


def test_rfc2231_names_with_charsets_and_continuations():
    cases = [
        "filename*=utf-8''%D1%81%D1%87%D1%91%D1%82.exe",
        "filename*=iso-8859-1'fr'r%E9sum%E9.exe",
        "filename*0*=iso-8859-1''r%E9sum%E9; filename*1=.e; filename*2=xe",
        "filename*0=\"invoice\"; filename*1=\".ex\"; filename*2=\"e\"",
        # Sections out of order are put back in order (RFC 2231 3).
        "filename*1=\"e.exe\"; filename*0=\"invoic\"",
        # An unknown charset does not stop the check.
        "filename*=x-unknown''r%E9sum%E9.exe",
    ]
    for value in cases:
        raw = corpus.message(corpus.part(b"x", disposition=None,
                                         headers=["Content-Disposition: attachment; " + value]))
        verdict = verdict_for(raw)
        assert verdict.action == "reject", value
        assert "blocked file type .exe" in verdict.reply.text, value
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: attachment; filename*0*=utf-8''%E2%80%AEinv; filename*1=fdp.exe"]))
    assert_blocked(verdict_for(raw), "\\u202einvfdp.exe", "U+202E")
    raw = corpus.message(corpus.part(corpus.pdf(), disposition=None, headers=[
        "Content-Disposition: attachment; filename*0*=utf-8''r%C3%A9sum; filename*1=\"é.pdf\""]))
    assert_passes(verdict_for(raw))


def test_name_only_in_content_type():
    raw = corpus.message(corpus.part(b"x", name="setup.exe", disposition=None))
    assert_blocked(verdict_for(raw), "setup.exe")
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: ATTACHMENT; FILENAME=SETUP.EXE"]))
    assert_blocked(verdict_for(raw), "SETUP.EXE")
    raw = corpus.message(corpus.part(b"x", ctype="application/octet-stream; NAME=setup.exe",
                                     disposition=None))
    assert_blocked(verdict_for(raw), "setup.exe")
    raw = corpus.message(corpus.part(b"x", name="setup.exe", disposition="inline"))
    assert_blocked(verdict_for(raw), "setup.exe")


def test_both_names_are_checked():
    # Content-Disposition says pdf, Content-Type says exe: a client may use either.
    raw = corpus.message(corpus.part(corpus.pdf(), "report.pdf", name="report.exe"))
    assert_blocked(verdict_for(raw), "report.exe")
    raw = corpus.message(corpus.part(corpus.pdf(), "report.exe", name="report.pdf"))
    assert_blocked(verdict_for(raw), "report.exe")


def test_duplicated_parameters_and_headers_are_all_checked():
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        'Content-Disposition: attachment; filename="a.pdf"; filename="a.exe"']))
    assert_blocked(verdict_for(raw), "a.exe")
    raw = corpus.message(corpus.part(b"x", "a.pdf", headers=[
        'Content-Disposition: attachment; filename="a.exe"']))
    assert_blocked(verdict_for(raw), "a.exe")
    # Unquoted with a space: the email package stops at the space, a client may not.
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: attachment; filename=invoice.pdf   .exe"]))
    assert_blocked(verdict_for(raw), "invoice.pdf   .exe")
    # An unquoted encoded-word the email package gives up on.
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: attachment; filename==?utf-8?b?aW52b2ljZS5leGU=?="]))
    assert_blocked(verdict_for(raw), "invoice.exe")


def test_headers_the_email_package_cannot_parse():
    # Fetching this Content-Disposition raises ValueError inside the email package.
    raw = corpus.message(corpus.part(corpus.pe(), disposition=None, headers=[
        "Content-Disposition: attachment; filename*=x\x00''report.pdf"]))
    assert report_for(raw).errors == []
    assert_blocked(verdict_for(raw, malformed="accept"), "report.pdf", "Windows PE executable")
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: attachment; filename*=x\x00''report.exe"]))
    assert_blocked(verdict_for(raw), "report.exe", "blocked file type .exe")


def test_raw_8bit_names_do_not_crash():
    for raw_name in (b"r\xc3\xa9sum\xc3\xa9.exe", b"r\xe9sum\xe9.exe", b"\xff\xfe.exe"):
        raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
            b'Content-Disposition: attachment; filename="' + raw_name + b'"']))
        verdict = verdict_for(raw)
        assert verdict.action == "reject" and "blocked file type .exe" in verdict.reply.text
    raw = corpus.message(corpus.part(corpus.pdf(), disposition=None, headers=[
        b'Content-Disposition: attachment; filename="r\xe9sum\xe9.pdf"']))
    assert_passes(verdict_for(raw))


def test_reply_text_is_safe_ascii_whatever_the_name():
    raw = corpus.message(corpus.part(b"x", disposition=None, headers=[
        "Content-Disposition: attachment; filename*=utf-8''a%0D%0A250%20OK%0D%0A" + "x" * 900
        + "%E2%80%AE.exe"]))
    verdict = verdict_for(raw)
    assert verdict.action == "reject"
    text = verdict.reply.text
    assert text.isascii() and "\r" not in text and "\n" not in text
    assert len(text) < 400
    for line in verdict.reply.lines():
        assert len(line) <= 512


def test_blocked_mime_types():
    raw = corpus.message(corpus.part(b"harmless", "tool.bin", "application/x-msdownload"))
    assert_passes(verdict_for(raw))
    verdict = verdict_for(raw, blocked_mime_types=("application/x-msdownload",))
    assert_blocked(verdict, "tool.bin", "blocked content type application/x-msdownload")
    verdict = verdict_for(raw, blocked_mime_types=("application/*",))
    assert_blocked(verdict, "tool.bin", "blocked content type application/x-msdownload")
    assert_passes(verdict_for(raw, blocked_mime_types=("audio/*", "application/zip")))
    # The declared type, even when it is odd enough for the email package to ignore it.
    raw = corpus.message(corpus.part(b"x", "a.bin", "Application/X-MSDownload "))
    assert verdict_for(raw, blocked_mime_types=("application/x-msdownload",)).action == "reject"


# ---------------------------------------------------------------------------------------------
# Content.
# ---------------------------------------------------------------------------------------------

EXECUTABLES = [
    ("pe", corpus.pe(), "Windows PE executable"),
    ("elf", corpus.elf(), "ELF executable"),
    ("java", corpus.java_class(), "Java class file"),
    ("fat", corpus.macho_fat(), "Mach-O universal binary"),
    ("shebang", corpus.shebang(), "script"),
    ("lnk", corpus.lnk(), "Windows shortcut"),
    ("vba", corpus.ole_vba(), "VBA macros"),
    ("msi", corpus.msi(), "Windows Installer package"),
    ("cab", corpus.cab(), "cabinet"),
    ("iso", corpus.iso(), "disk image"),
    ("dex", corpus.dex(), "DEX"),
    ("hta", corpus.hta(), "HTA"),
    ("url", corpus.url_shortcut(), "Internet shortcut"),
    ("jar", corpus.jar(), "Java archive"),
    ("docm", corpus.docm(), "VBA macros"),
    ("apk", corpus.zip_of([("AndroidManifest.xml", b"x"), ("classes.dex", corpus.dex())]),
     "Android package"),
    ("appx", corpus.zip_of([("AppxManifest.xml", b"<Package/>")]), "Windows app package"),
    ("dos", b"MZ\x90\x00\x03\x00\x00\x00" + b"\0" * 100, "DOS executable"),
    ("ne", corpus.pe().replace(b"PE\0\0", b"NE\x05\x01"), "Windows/OS2 NE executable"),
    ("reg", b"\xff\xfe" + "Windows Registry Editor Version 5.00\r\n".encode("utf-16-le"),
     "registry file"),
    ("scf", b"[Shell]\r\nCommand=2\r\nIconFile=\\\\host\\share\\x.ico\r\n",
     "Explorer command file"),
    ("onenote", bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3") + b"\0" * 64, "OneNote"),
    ("chm", b"ITSF\x03\x00\x00\x00" + b"\0" * 64, "HTML help"),
    ("vhdx", b"vhdxfile" + b"\0" * 64, "virtual disk image"),
] + [("macho%d" % i, corpus.macho(m), "Mach-O executable")
     for i, m in enumerate(corpus.MACHO_MAGICS)]


@pytest.mark.parametrize("label,data,kind", EXECUTABLES, ids=[e[0] for e in EXECUTABLES])
def test_executable_content_is_detected_whatever_the_name(label, data, kind):
    verdict = verdict_for(corpus.message_with(data, "report.pdf", ctype="application/pdf"))
    assert verdict.action == "reject", label
    assert "executable content" in verdict.reply.text and kind in verdict.reply.text
    # Also with no name at all.
    verdict = verdict_for(corpus.message(corpus.part(data, disposition=None)))
    assert verdict.action == "reject" and "unnamed part 2" in verdict.reply.text


def test_the_same_bytes_renamed():
    exe = corpus.pe()
    assert_blocked(verdict_for(corpus.message_with(exe, "setup.exe")), "setup.exe",
                   "blocked file type .exe")
    assert_blocked(verdict_for(corpus.message_with(exe, "invoice.pdf")), "invoice.pdf",
                   "executable content (Windows PE executable)")


@pytest.mark.parametrize("encoding", ["8bit", "binary"])
def test_unencoded_8bit_content_is_seen_as_sent(encoding):
    # get_payload() would decode these bytes with the charset and replace what does not decode.
    for data, kind in ((corpus.pe(), "Windows PE executable"), (corpus.ole_vba(), "VBA macros")):
        raw = corpus.message(corpus.part(data, "report.pdf", "application/pdf; charset=utf-8",
                                         encoding=encoding))
        assert_blocked(verdict_for(raw), "report.pdf", kind)


@pytest.mark.parametrize("value", ["base64 (a comment)", "BASE64; junk", '"base64"', " Base64 "])
def test_transfer_encoding_read_as_clients_read_it(value):
    raw = corpus.message(corpus.part(corpus.pe(), "report.pdf", encoding=value))
    assert_blocked(verdict_for(raw, malformed="accept"), "report.pdf", "Windows PE executable")


def test_detect_executables_off_checks_names_only():
    assert_passes(verdict_for(corpus.message_with(corpus.pe(), "report.pdf"),
                              detect_executables=False))
    assert verdict_for(corpus.message_with(corpus.pe(), "a.exe"),
                       detect_executables=False).action == "reject"


def test_text_heuristics_only_for_attachments():
    # A plain text body may begin with "#!": it is shown, not run.
    raw = corpus.HEADERS + b"Content-Type: text/plain\r\n\r\n#!/bin/sh\r\necho hello\r\n"
    assert_passes(verdict_for(raw))
    raw = corpus.message(corpus.part(corpus.shebang(), "notes.txt", "text/plain"))
    assert verdict_for(raw).action == "reject"


def test_text_starting_with_mz_is_not_an_executable():
    assert_passes(verdict_for(corpus.message_with(b"MZ is a two-letter word.\r\n" * 10, "a.txt",
                                                  ctype="text/plain")))


def test_inline_uuencoded_file_in_a_text_body():
    uu = b"begin 644 setup.exe\r\n" + b"".join(
        __import__("binascii").b2a_uu(corpus.pe()[i:i + 45]).replace(b"\n", b"\r\n")
        for i in range(0, 180, 45)) + b"`\r\nend\r\n"
    raw = corpus.HEADERS + b"Content-Type: text/plain\r\n\r\nSee below.\r\n\r\n" + uu
    assert_blocked(verdict_for(raw), "message body: setup.exe",
                   "blocked file type .exe")
    raw = corpus.HEADERS + b"Content-Type: text/plain\r\n\r\n" + uu.replace(b"setup.exe",
                                                                            b"setup.txt")
    assert verdict_for(raw).action == "reject"


# ---------------------------------------------------------------------------------------------
# Archives.
# ---------------------------------------------------------------------------------------------


def test_exe_in_zip_in_zip():
    raw = corpus.message_with(corpus.nested_zip(2), "outer.zip", ctype="application/zip")
    assert_blocked(verdict_for(raw), "outer.zip: level2.zip: evil.exe", "blocked file type .exe")


def test_archives_are_opened_by_content_not_by_name():
    raw = corpus.message_with(corpus.zip_of([("run.bin", corpus.pe())]), "holiday.jpg",
                              ctype="image/jpeg")
    assert_blocked(verdict_for(raw), "holiday.jpg: run.bin", "Windows PE executable")


def test_exe_in_tar_gz():
    data = corpus.tar_gz_of([("docs/readme.txt", b"read me"), ("bin/tool.exe", b"x")])
    assert_blocked(verdict_for(corpus.message_with(data, "bundle.tar.gz")),
                   "bundle.tar.gz: bin/tool.exe", "blocked file type .exe")
    data = corpus.tar_gz_of([("docs/readme.txt", b"read me"), ("bin/tool", corpus.elf())])
    assert_blocked(verdict_for(corpus.message_with(data, "bundle.tgz")),
                   "bundle.tgz: bin/tool", "ELF executable")
    clean = corpus.tar_gz_of([("docs/readme.txt", b"read me"), ("docs/a.pdf", corpus.pdf())])
    assert_passes(verdict_for(corpus.message_with(clean, "bundle.tar.gz")))


@pytest.mark.parametrize("wrap,name", [
    (lambda d: corpus.gzip_of(d, "payload.exe"), "x.gz: payload.exe"),
    (lambda d: corpus.gzip_of(d), "x.gz: x"),
    (corpus.bzip2_of, "x.gz: x"),
    (corpus.xz_of, "x.gz: x"),
    (lambda d: corpus.tar_of([("a/b.scr", d)]), "x.gz: a/b.scr"),
    (lambda d: corpus.xz_of(corpus.tar_of([("payload", d)])), "x.gz: payload"),
    (lambda d: corpus.bzip2_of(corpus.tar_of([("payload", d)])), "x.gz: payload"),
], ids=["gzip-named", "gzip", "bzip2", "xz", "tar", "tar.xz", "tar.bz2"])
def test_single_stream_compressors_and_tar(wrap, name):
    assert_blocked(verdict_for(corpus.message_with(wrap(corpus.pe()), "x.gz")), name)


def test_compressed_single_file_named_after_the_archive():
    raw = corpus.message_with(corpus.bzip2_of(b"harmless"), "tool.exe.bz2")
    assert_blocked(verdict_for(raw), "tool.exe.bz2: tool.exe", "blocked file type .exe")


def test_archive_depth_limit():
    # outer.zip is level 1: three levels are allowed by default, a fourth is not.
    assert_passes(verdict_for(corpus.message_with(corpus.nested_zip(3, "a.txt", b"hi"), "o.zip")))
    raw = corpus.message_with(corpus.nested_zip(4, "a.txt", b"hi"), "o.zip")
    assert_blocked(verdict_for(raw), "o.zip: level2.zip: level3.zip: level4.zip",
                   "archive nested deeper than max_archive_depth (3)")
    raw = corpus.message_with(corpus.nested_zip(2, "a.txt", b"hi"), "o.zip")
    assert_blocked(verdict_for(raw, max_archive_depth=1), "o.zip: level2.zip", "max_archive_depth")
    # A compressed tar is one level.
    raw = corpus.message_with(corpus.tar_gz_of([("a.txt", b"hi")]), "a.tgz")
    assert_passes(verdict_for(raw, max_archive_depth=1))


def test_encrypted_zip():
    data = corpus.encrypted_zip([("contract.pdf", corpus.pdf())])
    assert zipfile.ZipFile(__import__("io").BytesIO(data)).read("contract.pdf", pwd=b"secret") \
        == corpus.pdf()  # a real encrypted zip
    assert_blocked(verdict_for(corpus.message_with(data, "c.zip")), "c.zip: contract.pdf",
                   "encrypted archive member")
    assert_passes(verdict_for(corpus.message_with(data, "c.zip"), encrypted_archives="allow"))
    # Allowed, its content cannot be checked, but its name still is.
    data = corpus.encrypted_zip([("contract.pdf.exe", corpus.pe())])
    verdict = verdict_for(corpus.message_with(data, "c.zip"), encrypted_archives="allow")
    assert_blocked(verdict, "c.zip: contract.pdf.exe", "blocked file type .exe")


def test_zip_bomb_is_stopped_without_expanding_it():
    bomb = corpus.zip_bomb()  # 100 MB of zeros in about 450 KB
    raw = corpus.message_with(bomb, "bomb.zip")
    report = report_for(raw)
    assert [(f.name, f.reason) for f in report.blocked] == [
        ("bomb.zip: zeros.bin", "compression ratio exceeds max_compression_ratio (100)")]
    assert report.expanded == 0  # caught on the declared sizes, before inflating a byte
    assert_blocked(verdict_for(raw), "bomb.zip: zeros.bin", "max_compression_ratio")


def test_bomb_without_declared_sizes_is_stopped_while_streaming():
    raw = corpus.message_with(corpus.gzip_bomb(), "zeros.gz")
    report = report_for(raw)
    assert [f.reason for f in report.blocked] == [
        "compression ratio exceeds max_compression_ratio (100)"]
    # Stopped a chunk or so past the 1 MiB below which ratios are not judged: not 100 MB.
    assert mimewalk.RATIO_FLOOR < report.expanded < 2 * mimewalk.RATIO_FLOOR + mimewalk.CHUNK


def test_zip_lying_about_its_sizes_is_corrupt():
    # 10 MB of zeros declared as 1000 bytes: zipfile stops at 1000 and finds the CRC wrong.
    report = report_for(corpus.message_with(corpus.lying_zip_bomb(), "bomb.zip"))
    assert report.blocked == []
    assert len(report.malformed) == 1 and "corrupt zip archive" in report.malformed[0]
    assert report.expanded <= 1000


def test_expanded_size_is_capped_across_the_message():
    member = random.Random(1).randbytes(300 * 1024)  # does not compress
    raw = corpus.message(corpus.part(corpus.gzip_of(member), "a.gz"),
                         corpus.part(corpus.gzip_of(member), "b.gz"))
    assert_passes(verdict_for(raw, max_expanded_size=1024 * 1024))
    report = report_for(raw, max_expanded_size=500 * 1024)
    assert [(f.path, f.name) for f in report.blocked] == [((2,), "b.gz")]
    assert "max_expanded_size" in report.blocked[0].reason
    assert report.expanded <= 500 * 1024 + mimewalk.CHUNK


def test_declared_sizes_are_checked_before_expanding():
    raw = corpus.message_with(corpus.zip_of([("a.txt", b"a" * 200000), ("b.txt", b"b" * 200000)],
                                            zipfile.ZIP_STORED), "ab.zip")
    report = report_for(raw, max_expanded_size=300000)
    assert [f.reason for f in report.blocked] == [
        "declared expanded size exceeds max_expanded_size (300000 bytes)"]
    assert report.expanded == 0


def test_too_many_members():
    many = corpus.zip_of([("f%04d.txt" % i, b"") for i in range(1001)])
    report = report_for(corpus.message_with(many, "many.zip"))
    assert [(f.name, f.reason) for f in report.blocked] == [
        ("many.zip", "more than max_archive_members (1000) archive members")]
    assert report.members == 0  # counted from the directory before zipfile read it
    assert_passes(verdict_for(corpus.message_with(corpus.zip_of(
        [("f%04d.txt" % i, b"") for i in range(1000)]), "ok.zip")))
    # The count is across the whole message.
    half = corpus.zip_of([("f%d.txt" % i, b"") for i in range(6)])
    raw = corpus.message(corpus.part(half, "a.zip"), corpus.part(half, "b.zip"))
    assert_blocked(verdict_for(raw, max_archive_members=10), "b.zip", "max_archive_members (10)")
    tar = corpus.tar_gz_of([("f%d.txt" % i, b"") for i in range(11)])
    assert_blocked(verdict_for(corpus.message_with(tar, "t.tgz"), max_archive_members=10), "t.tgz")


def test_members_are_counted_from_the_directory_not_the_end_record():
    many = bytearray(corpus.zip_of([("f%04d.txt" % i, b"") for i in range(3000)],
                                   zipfile.ZIP_STORED))
    end = bytes(many).rfind(b"PK\x05\x06")
    many[end + 8:end + 12] = (1).to_bytes(2, "little") * 2  # "1 entry" (a lie)
    report = report_for(corpus.message_with(bytes(many), "many.zip"))
    assert [f.reason for f in report.blocked] == [
        "more than max_archive_members (1000) archive members"]
    assert report.members == 0


def test_member_names_from_unicode_path_extra_fields():
    data = corpus.unicode_path_zip("invoice.txt", "invoice.exe")
    assert_blocked(verdict_for(corpus.message_with(data, "z.zip")), "z.zip: invoice.txt",
                   "blocked file type .exe")


def test_zip_behind_other_data():
    data = b"GIF89a" + b"\0" * 100 + corpus.zip_of([("run.exe", b"x")])
    assert_blocked(verdict_for(corpus.message_with(data, "cat.gif", ctype="image/gif")),
                   "cat.gif: run.exe")


def test_stray_zip_signature_is_not_an_archive():
    data = corpus.pdf() + b"PK\x01\x02" + b"\0" * 50 + b"PK\x05\x06" + b"\0" * 18
    assert_passes(verdict_for(corpus.message_with(data, "odd.pdf")))


def test_office_documents():
    assert_passes(verdict_for(corpus.message_with(corpus.docx(), "a.docx")))
    assert_blocked(verdict_for(corpus.message_with(corpus.docx(), "a.docm")), "a.docm",
                   "blocked file type .docm")
    # A macro document renamed .docx is found by its VBA project.
    assert_blocked(verdict_for(corpus.message_with(corpus.docm(), "a.docx")),
                   "a.docx: word/vbaProject.bin", "document with VBA macros")
    assert_blocked(verdict_for(corpus.message_with(corpus.ole_vba(), "old.doc")), "old.doc",
                   "document with VBA macros")


def test_tnef_winmail_dat():
    clean = corpus.tnef([("REPORT~1.PDF", "report 2023.pdf", corpus.pdf())])
    raw = corpus.message_with(clean, "winmail.dat", ctype="application/ms-tnef")
    assert_passes(verdict_for(raw))
    assert report_for(raw).members == 1
    bad = corpus.tnef([("REPORT~1.PDF", "report 2023.pdf", corpus.pdf()),
                       ("INVOIC~1.PDF", "invoice.pdf.exe", b"x")])
    assert_blocked(verdict_for(corpus.message_with(bad, "winmail.dat")),
                   "winmail.dat: INVOIC~1.PDF", "blocked file type .exe (double extension")
    hidden = corpus.tnef([("DATA.PDF", None, corpus.pe())])
    assert_blocked(verdict_for(corpus.message_with(hidden, "winmail.dat")),
                   "winmail.dat: DATA.PDF", "Windows PE executable")
    assert_malformed(verdict_for(corpus.message_with(bad[:-7], "winmail.dat")),
                     "winmail.dat: corrupt TNEF")


def test_corrupt_archive_is_malformed():
    data = corpus.zip_of([("a.txt", b"hello" * 100)])
    broken = data[:40] + b"\xff" * 20 + data[60:]
    raw = corpus.message_with(broken, "a.zip")
    assert_malformed(verdict_for(raw), "a.zip: corrupt zip archive")
    assert_passes(verdict_for(raw, malformed="accept"))
    raw = corpus.message_with(b"PK\x03\x04" + b"\0" * 100, "b.zip")
    assert_malformed(verdict_for(raw), "b.zip: corrupt zip archive")
    raw = corpus.message_with(corpus.gzip_of(b"hello" * 1000)[:-30], "c.gz")
    assert_malformed(verdict_for(raw), "c.gz: corrupt gzip stream")


# ---------------------------------------------------------------------------------------------
# MIME structure.
# ---------------------------------------------------------------------------------------------


def test_message_rfc822_is_inspected():
    inner = corpus.message_with(corpus.pe(), "invoice.pdf")
    raw = corpus.message(corpus.rfc822_part(inner))
    assert_blocked(verdict_for(raw), "invoice.pdf", "Windows PE executable")
    assert report_for(raw).blocked[0].path == (1, 0, 1)
    assert_passes(verdict_for(corpus.message(corpus.rfc822_part(corpus.message_with(
        corpus.pdf(), "a.pdf")))))


def test_base64_encoded_message_rfc822_is_decoded():
    # RFC 2046 forbids it; the email package parses the base64 text as a message.
    clean = corpus.message(corpus.rfc822_part(corpus.message_with(corpus.pdf(), "a.pdf"),
                                              "base64"))
    assert_malformed(verdict_for(clean), "message/* part with Content-Transfer-Encoding base64")
    assert_passes(verdict_for(clean, malformed="accept"))
    # What it hides is decoded and checked; a blocked attachment outranks the malformed MIME.
    raw = corpus.message(corpus.rfc822_part(corpus.message_with(b"x", "setup.exe"), "base64"))
    assert_blocked(verdict_for(raw), "setup.exe")
    assert_blocked(verdict_for(raw, malformed="accept"), "setup.exe")
    report = report_for(raw)
    assert report.blocked[0].path == (1,)  # to strip: the whole attached message
    assert report.malformed


def test_message_partial_cannot_be_inspected():
    raw = corpus.message(b'Content-Type: message/partial; id="x"; number=1; total=2\r\n\r\n'
                         + corpus.HEADERS)
    assert_blocked(verdict_for(raw), "unnamed part 2", "message/partial")


def test_single_part_message_that_is_an_attachment():
    raw = corpus.HEADERS + corpus.part(corpus.pe(), "a.pdf")
    assert_blocked(verdict_for(raw), "a.pdf", "Windows PE executable")


def test_deep_mime_nesting():
    assert_passes(verdict_for(corpus.nested_multipart(20)))
    raw = corpus.nested_multipart(21)
    assert_malformed(verdict_for(raw), "MIME nesting deeper than max_mime_depth (20)")
    assert_passes(verdict_for(raw, malformed="accept"))
    assert_malformed(verdict_for(corpus.nested_multipart(5), max_mime_depth=4), "max_mime_depth")


def test_limits_accepted_still_check_attachments():
    raw = corpus.nested_multipart(30, corpus.part(b"x", "deep.exe"))
    assert_malformed(verdict_for(raw), "max_mime_depth")
    assert_blocked(verdict_for(raw, malformed="accept"), "deep.exe")


def test_too_many_parts():
    parts = [corpus.part(corpus.pdf(), "p%d.pdf" % i) for i in range(498)]
    assert_passes(verdict_for(corpus.message(*parts)))  # 500 with the root and the body
    raw = corpus.message(*(parts + [corpus.part(corpus.pdf(), "last.pdf")]))
    assert_malformed(verdict_for(raw), "more than max_parts (500) MIME parts")
    assert_passes(verdict_for(raw, malformed="accept"))
    report = report_for(raw)
    assert report.parts == 501  # stopped at the limit


def test_broken_boundaries():
    raw = corpus.HEADERS + (b'Content-Type: multipart/mixed; boundary="right"\r\n\r\n'
                            b"--wrong\r\n" + corpus.part(b"x", "a.exe") + b"\r\n--wrong--\r\n")
    assert_malformed(verdict_for(raw), "multipart start boundary not found")
    raw = corpus.message(corpus.part(corpus.pdf(), "a.pdf"))[:-12]  # no close delimiter
    assert_malformed(verdict_for(raw), "close boundary not found")
    raw = corpus.HEADERS + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n"
    assert_malformed(verdict_for(raw), "multipart without a boundary")
    assert_passes(verdict_for(raw, malformed="accept"))


def test_ambiguous_boundaries():
    raw = corpus.HEADERS + (b'Content-Type: multipart/mixed; boundary="a"; boundary="b"\r\n\r\n'
                            b"--a\r\n" + corpus.text_part() + b"\r\n--b\r\n"
                            + corpus.part(b"x", "a.txt") + b"\r\n--b--\r\n--a--\r\n")
    assert_malformed(verdict_for(raw), "message body: more than one boundary parameter")


def test_broken_part_headers():
    # A header line without a colon ends the headers for us, maybe not for the mail client.
    raw = corpus.message(b"Content-Type: application/octet-stream\r\nnot a header\r\n"
                         b"Content-Disposition: attachment; filename=a.exe\r\n\r\nxx")
    assert_malformed(verdict_for(raw), "part 2: header line without a colon")
    raw = corpus.message(corpus.part(corpus.pdf(), "a.pdf", headers=["Content-Type: text/plain"]))
    assert_malformed(verdict_for(raw), "part 2: more than one Content-Type header")


def test_inspection_does_not_modify_the_message():
    raw = corpus.message(b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
                         b"filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n!!"
                         + base64.b64encode(corpus.pdf() + b"x").rstrip(b"="),
                         corpus.part(corpus.zip_of([("a.txt", b"x")]), "a.zip"))
    message = corpus.parse(raw)
    before = [(list(p.defects), p.as_bytes()) for p in message.parsed.walk()]
    for action in ("reject", "strip"):
        result_of(make_filter(action=action).on_data(None, message))
    assert [(list(p.defects), p.as_bytes()) for p in message.parsed.walk()] == before


def test_undecodable_base64():
    def undecodable(data):
        data += b"\n" * (-len(data) % 3)  # no padding: one more character cannot be decoded
        return corpus.message(b"Content-Type: application/octet-stream\r\nContent-Disposition: "
                              b"attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64"
                              b"\r\n\r\n" + base64.b64encode(data) + b"A")

    assert_malformed(verdict_for(undecodable(corpus.pdf())), "part 2: base64 content cannot be "
                                                             "decoded")
    assert_passes(verdict_for(undecodable(corpus.pdf()), malformed="accept"))
    # The best reading of it is still checked (and a blocked attachment outranks malformed).
    assert_blocked(verdict_for(undecodable(corpus.pe())), "a.bin", "Windows PE executable")
    assert_blocked(verdict_for(undecodable(corpus.pe()), malformed="accept"), "a.bin")
    # Missing padding is harmless: decoded as every client does.
    raw = corpus.message(b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
                         b"filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                         + base64.b64encode(corpus.pdf() + b"x").rstrip(b"="))
    assert_passes(verdict_for(raw))


# ---------------------------------------------------------------------------------------------
# Actions.
# ---------------------------------------------------------------------------------------------


def test_quarantine_action():
    verdict = verdict_for(corpus.message_with(corpus.pe(), "a.pdf"), action="quarantine")
    assert verdict.action == "quarantine"
    assert verdict.reason == "attachment a.pdf is not allowed (executable content (Windows PE " \
                             "executable))"
    assert verdict.reply is None and verdict.message is None
    assert_passes(verdict_for(corpus.message_with(corpus.pdf(), "a.pdf"), action="quarantine"))
    # Malformed still rejects when malformed = reject.
    assert_malformed(verdict_for(corpus.nested_multipart(25), action="quarantine"))


def test_strip_action_replaces_only_the_offending_parts():
    pdf, png = corpus.pdf(), corpus.png()
    raw = corpus.message(corpus.part(pdf, "report.pdf", "application/pdf"),
                         corpus.part(corpus.pe(), "setup.exe"),
                         corpus.part(png, "photo.png", "image/png"),
                         corpus.part(corpus.zip_of([("docs/a.txt", b"a"), ("run.js", b"x")]),
                                     "files.zip"))
    message = corpus.parse(raw)
    before = message.parsed.as_bytes()
    verdict = result_of(make_filter(action="strip").on_data(None, message))
    assert verdict.action == "next" and verdict.message is not None
    assert message.parsed.as_bytes() == before  # the original is untouched

    stripped = BytesParser(policy=email_policy.default).parsebytes(verdict.message.as_bytes())
    parts = stripped.get_payload()
    assert len(parts) == 5
    assert parts[0].get_content() == "Please find the documents attached.\n"
    assert parts[1].get_filename() == "report.pdf" and parts[1].get_content() == pdf
    assert parts[3].get_filename() == "photo.png" and parts[3].get_content() == png
    for index, what in ((2, "setup.exe: blocked file type .exe"),
                        (4, "files.zip: run.js: blocked file type .js")):
        note = parts[index]
        assert note.get_content_type() == "text/plain" and note.get_filename() is None
        assert "removed an attachment" in note.get_content() and what in note.get_content()
    assert stripped["Subject"] == "documents"
    assert_passes(verdict_for(verdict.message.as_bytes()))  # nothing left to strip


def test_strip_inside_an_attached_message():
    inner = corpus.message(corpus.part(corpus.pdf(), "a.pdf"), corpus.part(b"x", "b.exe"))
    verdict = verdict_for(corpus.message(corpus.rfc822_part(inner)), action="strip")
    stripped = BytesParser(policy=email_policy.default).parsebytes(verdict.message.as_bytes())
    attached = stripped.get_payload()[1].get_payload()[0]
    assert [p.get_filename() for p in attached.get_payload()] == [None, "a.pdf", None]
    assert "b.exe" in attached.get_payload()[2].get_content()


def test_strip_a_single_part_message():
    raw = corpus.HEADERS + corpus.part(corpus.pe(), "a.pdf")
    verdict = verdict_for(raw, action="strip")
    stripped = BytesParser(policy=email_policy.default).parsebytes(verdict.message.as_bytes())
    assert stripped["Subject"] == "documents" and stripped.get_content_type() == "text/plain"
    assert "a.pdf: executable content" in stripped.get_content()


def test_strip_with_malformed_reject_rejects_structure():
    verdict = verdict_for(corpus.nested_multipart(25, corpus.part(b"x", "a.exe")), action="strip")
    assert_malformed(verdict)


def test_strip_failure_rejects(monkeypatch):
    def broken(*args):
        raise RecursionError("too deep")

    monkeypatch.setattr(mimewalk, "strip", broken)
    verdict = verdict_for(corpus.message_with(b"x", "a.exe"), action="strip")
    assert_blocked(verdict, "a.exe")


# ---------------------------------------------------------------------------------------------
# Never crash.
# ---------------------------------------------------------------------------------------------


def test_unexpected_errors_become_malformed_verdicts(monkeypatch):
    def broken(*args):
        raise MemoryError()

    monkeypatch.setattr(mimewalk, "inspect", broken)
    raw = corpus.message_with(corpus.pdf(), "a.pdf")
    assert_malformed(verdict_for(raw), "could not be inspected")
    assert_passes(verdict_for(raw, malformed="accept"))


def test_an_error_in_one_part_does_not_stop_the_others(monkeypatch):
    real = mimewalk.decode_payload

    def flaky(part):
        if part.get_filename() == "bad.pdf":
            raise ValueError("boom")
        return real(part)

    monkeypatch.setattr(mime_walker, "decode_payload", flaky)
    raw = corpus.message(corpus.part(corpus.pdf(), "bad.pdf"), corpus.part(b"x", "evil.exe"))
    assert_blocked(verdict_for(raw, malformed="accept"), "evil.exe")
    assert_malformed(verdict_for(corpus.message(corpus.part(corpus.pdf(), "bad.pdf"))),
                     "part 2 could not be inspected (ValueError)")


def test_a_failing_thread_becomes_a_malformed_verdict():
    f = attachments.AttachmentFilter(AttachmentsConfig(),
                                     lambda *a: defer.fail(RuntimeError("pool gone")))
    assert_malformed(result_of(f.on_data(None, corpus.parse(corpus.message()))))


SAMPLES = [
    corpus.message_with(corpus.docx(), "a.docx"),
    corpus.message_with(corpus.tar_gz_of([("a/b.txt", b"hello"), ("c", corpus.pdf())]), "t.tgz"),
    corpus.message_with(corpus.nested_zip(2, "a.txt", b"hi"), "z.zip"),
    corpus.message_with(corpus.xz_of(corpus.tar_of([("x", b"y" * 3000)])), "x.txz"),
    corpus.message_with(corpus.bzip2_of(b"z" * 5000), "x.bz2"),
    corpus.message_with(corpus.encrypted_zip([("a.txt", b"x")]), "e.zip"),
    corpus.message_with(corpus.ole_plain_doc(), "d.doc"),
    corpus.message_with(corpus.tnef([("A.PDF", "a.pdf", corpus.pdf())]), "winmail.dat"),
    corpus.message(corpus.rfc822_part(corpus.message_with(corpus.pdf(), "a.pdf"))),
]


def test_damaged_inputs_never_crash():
    rng = random.Random(2024)
    for sample in SAMPLES:
        message = corpus.parse(sample)
        attachment = message.parsed.get_payload()[-1]
        data = attachment.get_content() if attachment.get_content_maintype() != "message" else None
        for _ in range(60):
            if data is not None:
                damaged = bytearray(data)
                for _ in range(rng.randint(1, 8)):
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
                cut = rng.choice([len(damaged), rng.randrange(len(damaged))])
                raw = corpus.message_with(bytes(damaged[:cut]), attachment.get_filename())
            else:
                damaged = bytearray(sample)
                for _ in range(rng.randint(1, 8)):
                    damaged[rng.randrange(len(damaged))] = rng.choice(b"-\r\n=:;\"AZ\x00\xff")
                raw = bytes(damaged)
            for options in ({}, {"malformed": "accept", "action": "strip"}):
                verdict = verdict_for(raw, **options)
                assert verdict.action in ("next", "reject", "quarantine")
                assert not verdict.reply or verdict.reply.status in ("5.7.1", "5.6.0")
                report = report_for(raw, **options)
                assert report.errors == [], report.errors  # handled, not merely survived
