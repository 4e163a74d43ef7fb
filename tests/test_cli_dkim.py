"""mailgate dkim-keygen: the key it writes signs, and the record it prints verifies."""

import os
import re
import stat

import dkim
import pytest
from twisted.internet import defer

from mailgate import cli
from mailgate.config import DKIMConfig
from mailgate.delivery.dkimsign import DKIMSigner

from tests.test_cli import run, run_process

MESSAGE = (
    b"From: Alice <alice@mail.example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hi Bob.\r\n"
)

RECORD = re.compile(r'(\S+) IN TXT ((?:"[^"]*")(?: "[^"]*")*)')


def records_from(out):
    """The printed record as the dict a dnsfunc serves (after checking its zone-file form)."""
    lines = [line for line in out.splitlines() if " IN TXT " in line]
    assert len(lines) == 1, out
    match = RECORD.fullmatch(lines[0])
    assert match, lines[0]
    strings = re.findall(r'"([^"]*)"', match.group(2))
    assert all(len(s.encode("ascii")) <= 255 for s in strings)
    return {match.group(1).encode("ascii"): "".join(strings).encode("ascii")}


def sign_and_verify(key_path, selector, records):
    config = DKIMConfig(sign_domains=("example.com",), selector=selector, private_key=key_path)
    signer = DKIMSigner(config, lambda f, *args: defer.maybeDeferred(f, *args))
    out = []
    signer.sign(MESSAGE).addBoth(out.append)
    assert isinstance(out[0], bytes), out
    lookup = lambda name, timeout=5: records.get(name)  # noqa: E731
    assert dkim.verify(out[0] + MESSAGE, dnsfunc=lookup)
    assert not dkim.verify(out[0] + MESSAGE.replace(b"Hi", b"Yo"), dnsfunc=lookup)
    return signer


@pytest.mark.parametrize("argv, key_type", [([], "rsa"), (["--type", "rsa"], "rsa"),
                                            (["--type", "ed25519"], "ed25519")])
def test_keygen_end_to_end(tmp_path, capsys, argv, key_type):
    argv = ["dkim-keygen", "example.com", "mg2024", "--out", str(tmp_path)] + argv
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    path = tmp_path / "mg2024.example.com.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert str(path) in out
    records = records_from(out)
    assert list(records) == [b"mg2024._domainkey.example.com."]
    value = records[b"mg2024._domainkey.example.com."]
    assert value.startswith(b"v=DKIM1; k=%s; p=" % key_type.encode())
    signer = sign_and_verify(str(path), "mg2024", records)
    assert signer.key_type == key_type
    # the output is zone-file text: every line is a comment or the record
    assert all(line.startswith(";") or " IN TXT " in line for line in out.splitlines())


def test_rsa_record_is_split_into_strings(tmp_path, capsys):
    argv = ["dkim-keygen", "example.com", "big", "--bits", "4096", "--out", str(tmp_path)]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    line = [line for line in out.splitlines() if " IN TXT " in line][0]
    assert len(re.findall(r'"[^"]*"', line)) == 3  # a 4096-bit key's p= is about 740 characters
    sign_and_verify(str(tmp_path / "big.example.com.key"), "big", records_from(out))


def test_default_out_is_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "dkim-keygen", "Example.COM.", "s1", "--type", "ed25519")
    assert (code, err) == (0, "")
    assert os.listdir(tmp_path) == ["s1.example.com.key"]
    assert list(records_from(out)) == [b"s1._domainkey.example.com."]


def test_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "s1.example.com.key"
    path.write_bytes(b"the key in use")
    code, out, err = run(capsys, "dkim-keygen", "example.com", "s1", "--out", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err == "mailgate: %s: already exists, not overwritten\n" % path
    assert path.read_bytes() == b"the key in use"


def test_out_directory_is_created_for_the_owner_only(tmp_path, capsys):
    out_dir = tmp_path / "keys" / "dkim"
    code, out, err = run(capsys, "dkim-keygen", "example.com", "s1", "--out", str(out_dir))
    assert (code, err) == (0, "")
    assert stat.S_IMODE(os.stat(out_dir).st_mode) == 0o700
    assert (out_dir / "s1.example.com.key").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["exa mple.com", "s1"], "expected a domain"),
        (["_dmarc.example.com", "s1"], "expected a domain"),
        (["example.com", "../s1"], "expected a selector"),
        (["example.com", "s1/x"], "expected a selector"),
        (["example.com", "s1", "--type", "ed25519", "--bits", "4096"], "--bits is for rsa"),
        (["example.com", "s1", "--out", "/dev/null/dir"], "/dev/null/dir: Not a directory"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "dkim-keygen", *argv)
    assert code == 1
    assert out == ""
    assert err.startswith("mailgate: ") and err.count("\n") == 1, err
    assert words in err
    assert os.listdir(tmp_path) == []


def test_argparse_errors(capsys):
    code, _, err = run(capsys, "dkim-keygen", "example.com")
    assert code == 2 and "SELECTOR" in err
    code, _, err = run(capsys, "dkim-keygen", "example.com", "s1", "--type", "dsa")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "dkim-keygen", "example.com", "s1", "--bits", "1024")
    assert code == 2 and "invalid choice" in err


def test_unwritable_directory(tmp_path, capsys):
    # Below a regular file: refused even for root, which CI runs as.
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "keys")
    code, _, err = run(capsys, "dkim-keygen", "example.com", "s1", "--out", out)
    assert code == 1 and "Not a directory" in err and len(err.strip().splitlines()) == 1


def test_as_a_process(tmp_path):
    argv = ["dkim-keygen", "example.com", "p1", "--type", "ed25519", "--out", str(tmp_path)]
    done = run_process(*argv)
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr
    records = records_from(done.stdout.decode("ascii"))
    sign_and_verify(str(tmp_path / "p1.example.com.key"), "p1", records)


def test_help_lists_the_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "dkim-keygen" in out
    assert cli.main(["dkim-keygen", "--help"]) == 0
