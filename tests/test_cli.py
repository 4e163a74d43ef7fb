"""The mailgate command: one line and exit 1 on any bad input, never a traceback."""

import io
import os
import subprocess
import sys

import pytest

from mailgate import cli
from mailgate.errors import ConfigError

from tests.config.test_config import BROKEN, PLAIN, REPO

EXAMPLE = os.path.join(REPO, "etc", "mailgate.ini")


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv, input=None):
    return subprocess.run(
        [sys.executable, "-m", "mailgate.cli"] + list(argv),
        input=input,
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )


# --- check-config ------------------------------------------------------------------------------


def test_check_config_example(capsys):
    code, out, err = run(capsys, "check-config", EXAMPLE)
    assert code == 0
    assert out.endswith("\n%s: configuration OK\n" % EXAMPLE)
    assert "\n[listener:relay]\n" in out
    assert "\nusers_file = %s\n" % os.path.join(REPO, "etc", "users") in out
    assert "Traceback" not in err


def test_check_config_prints_the_effective_config(tmp_path, capsys):
    path = tmp_path / "m.ini"
    path.write_text(PLAIN)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 0
    assert out.splitlines()[-1] == "%s: configuration OK" % path
    assert "\nsession_timeout = 30m\n" in out
    assert "\nmax_recipients = 100\n" in out


@pytest.mark.parametrize("text, expected", BROKEN[::4] + BROKEN[-6:])
def test_check_config_broken(tmp_path, capsys, text, expected):
    path = tmp_path / "broken.ini"
    path.write_text(text)
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (1, "")
    assert err == "mailgate: " + expected.replace("FILE", str(path)) + "\n"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: str(tmp / "missing.ini"), "cannot read: No such file or directory"),
        (lambda tmp: str(tmp), "cannot read: Is a directory"),
        (lambda tmp: "", "cannot read: No such file or directory"),
        (lambda tmp: "a\0b", "cannot read: embedded null byte"),
    ],
)
def test_check_config_unreadable(tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, out, err = run(capsys, "check-config", path)
    assert (code, out) == (1, "")
    assert err == "mailgate: %s: %s\n" % (path.replace("\n", "\\n"), message)


def test_check_config_binary_file(tmp_path, capsys):
    path = tmp_path / "binary.ini"
    path.write_bytes(bytes(range(256)))
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (1, "")
    assert err == "mailgate: %s: cannot read: not UTF-8 text (byte 0x80 at offset 128)\n" % path


def test_check_config_reports_tls_errors(tmp_path, capsys, monkeypatch):
    tls = pytest.importorskip("mailgate.tls")

    def check_tls_config(config):
        raise ConfigError("x.ini", "tls", "certificate", "expired")

    monkeypatch.setattr(tls, "check_tls_config", check_tls_config)
    path = tmp_path / "m.ini"
    path.write_text(PLAIN)
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out, err) == (1, "", "mailgate: x.ini: [tls] certificate: expired\n")


def test_check_config_prints_tls_warnings(tmp_path, capsys, monkeypatch):
    tls = pytest.importorskip("mailgate.tls")
    monkeypatch.setattr(tls, "check_tls_config", lambda config: ["expires soon"])
    path = tmp_path / "m.ini"
    path.write_text(PLAIN)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 0
    assert err == "mailgate: warning: expires soon\n"


def test_check_config_without_tls_module(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mailgate.tls", None)  # as if not written yet
    path = tmp_path / "m.ini"
    path.write_text(PLAIN)
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, err) == (0, "")


def test_check_config_in_a_process():
    done = run_process("check-config", "etc/mailgate.ini")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().endswith("etc/mailgate.ini: configuration OK\n")


def test_check_config_missing_file_in_a_process():
    done = run_process("check-config", "etc/nope.ini")
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == b"mailgate: etc/nope.ini: cannot read: No such file or directory\n"


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["check-config"]) == 2
    assert "usage: mailgate" in capsys.readouterr().err


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check-config" in out and "passwd" in out


# --- passwd ------------------------------------------------------------------------------------


@pytest.fixture
def auth():
    return pytest.importorskip("mailgate.smtp.auth")


def users_in(path):
    from mailgate.smtp.auth import parse_users

    with open(path, encoding="utf-8") as f:
        return parse_users(f.read())


def test_passwd_stdin(auth, tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "users")
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret pass\nignored\n"))
    code, out, err = run(capsys, "passwd", path, "alice", "--password-stdin",
                         "--sender", "alice@example.com", "--sender", "@example.org")
    assert (code, err) == (0, "")
    assert out == "%s: user alice saved\n" % path
    hashed, senders = users_in(path)["alice"]
    assert senders == ("alice@example.com", "@example.org")
    assert auth.verify_password("s3cret pass", hashed)


def test_passwd_stdin_crlf(auth, tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "users")
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\r\n"))
    assert run(capsys, "passwd", path, "bob", "--password-stdin")[0] == 0
    assert auth.verify_password("pw", users_in(path)["bob"][0])


def test_passwd_replaces(auth, tmp_path, capsys, monkeypatch):
    path = tmp_path / "users"
    path.write_text("# a comment\n")
    for password in ("one", "two"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
        assert run(capsys, "passwd", str(path), "carol", "--password-stdin")[0] == 0
    users = users_in(str(path))
    assert list(users) == ["carol"]
    assert auth.verify_password("two", users["carol"][0])
    assert path.read_text().startswith("# a comment\n")


def test_passwd_prompts_twice(auth, tmp_path, capsys, monkeypatch):
    answers = iter(["pw", "pw"])
    prompts = []
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: prompts.append(prompt) or next(answers))
    path = str(tmp_path / "users")
    code, out, err = run(capsys, "passwd", path, "dave")
    assert (code, out, err) == (0, "%s: user dave saved\n" % path, "")
    assert len(prompts) == 2 and "dave" in prompts[0]
    assert auth.verify_password("pw", users_in(path)["dave"][0])


@pytest.mark.parametrize(
    "answers, message",
    [(["a", "b"], "the passwords do not match"), (["", ""], "empty password")],
)
def test_passwd_prompt_refused(auth, tmp_path, capsys, monkeypatch, answers, message):
    answers = iter(answers)
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    path = tmp_path / "users"
    assert run(capsys, "passwd", str(path), "erin") == (1, "", "mailgate: %s\n" % message)
    assert not path.exists()


def test_passwd_interrupted(auth, tmp_path, capsys, monkeypatch):
    def interrupted(prompt):
        raise KeyboardInterrupt()

    monkeypatch.setattr(cli.getpass, "getpass", interrupted)
    assert run(capsys, "passwd", str(tmp_path / "users"), "erin") == (1, "", "mailgate: no password given\n")


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_passwd_empty_stdin(auth, tmp_path, capsys, monkeypatch, stdin):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = run(capsys, "passwd", str(tmp_path / "users"), "f", "--password-stdin")
    assert (code, out, err) == (1, "", "mailgate: empty password\n")


@pytest.mark.parametrize(
    "argv",
    [["bad:name"], ["#name"], ["ok", "--sender", "not an address"]],
)
def test_passwd_bad_input_is_one_line(auth, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    code, out, err = run(capsys, "passwd", str(tmp_path / "users"), *argv, "--password-stdin")
    assert (code, out) == (1, "")
    assert err.startswith("mailgate: ") and err.count("\n") == 1
    assert not (tmp_path / "users").exists()


def test_passwd_unwritable(auth, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    path = str(tmp_path / "no" / "such" / "dir" / "users")
    code, out, err = run(capsys, "passwd", path, "gina", "--password-stdin")
    assert (code, out) == (1, "")
    assert err.startswith("mailgate: ") and err.count("\n") == 1
    assert "No such file or directory" in err


def test_passwd_in_a_process(auth, tmp_path):
    path = str(tmp_path / "users")
    done = run_process("passwd", path, "hank", "--password-stdin", input=b"pw\n")
    assert (done.returncode, done.stderr) == (0, b"")
    assert auth.verify_password("pw", users_in(path)["hank"][0])


def test_passwd_stdin_not_utf8_in_a_process(auth, tmp_path):
    done = run_process("passwd", str(tmp_path / "users"), "ivy", "--password-stdin", input=b"\xff\xfe\n",
                       )
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1
