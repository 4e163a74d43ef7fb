"""
The ``mailgate`` command: check a configuration file, manage the users file, make DKIM keys.

Every failure is one line on stderr and exit status 1, never a traceback: the people running it
are fixing a config file, not debugging Python.
"""

import argparse
import getpass
import os
import re
import sys

from mailgate.config import load_config, render_config
from mailgate.errors import ConfigError


def main(argv=None):
    """Run one subcommand; returns the exit status (argparse's own errors included)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    return args.run(args)


def _parser():
    parser = argparse.ArgumentParser(prog="mailgate", description="mailgate administration")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check-config",
        help="check a configuration file and print it with every default filled in",
    )
    check.add_argument("file", metavar="FILE", help="the ini file, e.g. /etc/mailgate/mailgate.ini")
    check.set_defaults(run=_check_config)

    passwd = commands.add_parser("passwd", help="add a user to a users file, or change one")
    passwd.add_argument("file", metavar="FILE", help="the users file ([auth] users_file)")
    passwd.add_argument("user", metavar="USER", help="the username given to SMTP AUTH")
    passwd.add_argument(
        "--sender",
        metavar="ADDR",
        action="append",
        help="an address or @domain the user may send as (repeat for more)",
    )
    passwd.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )
    passwd.set_defaults(run=_passwd)

    keygen = commands.add_parser(
        "dkim-keygen",
        help="make a DKIM key pair: write the private key, print the DNS record to publish",
    )
    keygen.add_argument(
        "domain", metavar="DOMAIN", help="the signing domain (d=), e.g. example.com"
    )
    keygen.add_argument("selector", metavar="SELECTOR", help="the selector (s=), e.g. mail2024")
    keygen.add_argument(
        "--type",
        dest="key_type",
        choices=("rsa", "ed25519"),
        default="rsa",
        help="the key type (default: rsa); ed25519 (RFC 8463) is best published beside an rsa key",
    )
    keygen.add_argument(
        "--bits",
        type=int,
        choices=(2048, 3072, 4096),
        default=None,
        help="the RSA key size (default: 2048)",
    )
    keygen.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="where to write SELECTOR.DOMAIN.key (default: the current directory)",
    )
    keygen.set_defaults(run=_dkim_keygen)
    return parser


def _check_config(args):
    try:
        config = load_config(args.file)
        warnings = _check_tls(config)
    except ConfigError as e:
        return _fail(str(e))
    for warning in warnings:
        _print("mailgate: warning: %s" % (warning,), sys.stderr)
    _print(render_config(config), end="")
    _print("%s: configuration OK" % (args.file,))
    return 0


def _check_tls(config):
    """mailgate.tls's deeper checks (the certificate itself), when that module is present."""
    try:
        from mailgate.tls import check_tls_config
    except ImportError as e:
        if e.name not in ("mailgate.tls", None):
            raise  # mailgate.tls is there but broken: that is a bug to see, not to hide
        return []
    return check_tls_config(config) or []


def _passwd(args):
    from mailgate.auth import set_user  # only this subcommand needs it

    try:
        password = _read_password(args.user, args.password_stdin)
        set_user(args.file, args.user, password, args.sender or [])
    except ValueError as e:
        return _fail(str(e))
    except (EOFError, KeyboardInterrupt):
        return _fail("no password given")
    except OSError as e:
        return _fail("%s: %s" % (e.filename or args.file, e.strerror or e))
    _print("%s: user %s saved" % (args.file, args.user))
    return 0


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _dns_name(what, text, underscore):
    """A DNS name of LDH labels (underscores too when underscore), one trailing dot dropped."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    ok = 1 <= len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
    if not ok or (not underscore and "_" in name):
        raise ValueError("expected %s, got %r" % (what, text))
    return name


def _dkim_keygen(args):
    from mailgate import dkimsign  # only this subcommand needs it

    try:
        domain = _dns_name("a domain like example.com", args.domain, False).lower()
        selector = _dns_name("a selector like mail2024", args.selector, True)
        if args.bits is not None and args.key_type != "rsa":
            raise ValueError("--bits is for rsa keys only")
    except ValueError as e:
        return _fail(str(e))
    path = os.path.join(args.out, "%s.%s.key" % (selector, domain))
    if os.path.lexists(path):  # checked again, race-free, when it is created
        return _fail("%s: already exists, not overwritten" % (path,))
    pem, txt = dkimsign.generate_key(args.key_type, args.bits or 2048)
    try:
        dkimsign.write_key(path, pem)
    except FileExistsError:
        return _fail("%s: already exists, not overwritten" % (path,))
    except OSError as e:
        return _fail("%s: %s" % (e.filename or path, e.strerror or e))
    comment = "; %s key written to %s (keep it secret); publish this DNS record:"
    _print(comment % (args.key_type, path))
    _print(dkimsign.dns_record(selector, domain, txt))
    return 0


def _read_password(user, from_stdin):
    if from_stdin:
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise ValueError("the password on stdin is not UTF-8 text") from None
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        password = getpass.getpass("Password for %s: " % (user,))
        if password != getpass.getpass("Password again: "):
            raise ValueError("the passwords do not match")
    if not password:
        raise ValueError("empty password")
    return password


def _fail(message):
    _print("mailgate: " + message.replace("\n", "\\n"), sys.stderr)
    return 1


def _print(text, stream=None, end="\n"):
    """print, but a name the terminal cannot encode is escaped rather than a traceback."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, end=end)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), file=stream, end=end)


if __name__ == "__main__":
    sys.exit(main())
