"""
The ``mailgate`` command: check a configuration file, manage the users file, make DKIM keys,
and diagnose: check-tls (one SMTP server's TLS) and diagnose (a domain's whole mail set-up).

Every failure is one line on stderr and exit status 1, never a traceback: the people running it
are fixing a config file, not debugging Python.
"""

import argparse
import getpass
import os
import re
import sys

from mailgate.smtp.address import is_ip_address
from mailgate.config import DEFAULT_CONFIG, load_config, render_config
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

    queue = commands.add_parser(
        "queue", help="list and manage the running gateway's queue (through its admin socket)"
    )
    actions = queue.add_subparsers(title="actions", metavar="ACTION", dest="action", required=True)
    for name, text in (
        ("list", "list queued mail, like postqueue -p"),
        ("show", "a message's envelope, recipients and their status, and headers"),
        ("flush", "retry deferred mail now (one message, or all)"),
        ("hold", "put a message on hold: not delivered until released"),
        ("release", "release a held or quarantined message: delivered now"),
        ("delete", "delete a message without telling anyone"),
        ("bounce", "give up on a message: bounce its pending recipients to the sender now"),
    ):
        action = actions.add_parser(name, help=text)
        if name == "list":
            action.add_argument("--state", choices=("active", "deferred", "held", "quarantine"))
        if name == "flush":
            action.add_argument("id", metavar="ID", nargs="?", help="a queue id (default: all)")
        elif name != "list":
            action.add_argument("id", metavar="ID", help="a queue id")
        if name in ("list", "show"):
            action.add_argument("--json", action="store_true", help="print JSON")
        _config_option(action)
        action.set_defaults(run=_queue)

    upgrade = commands.add_parser(
        "db-upgrade",
        help="create or upgrade the PostgreSQL queue's schema ([queue] backend = postgresql)",
    )
    _config_option(upgrade)
    upgrade.set_defaults(run=_db_upgrade)

    reload_ = commands.add_parser(
        "reload", help="make the running gateway re-read its configuration and users file"
    )
    _config_option(reload_)
    reload_.set_defaults(run=_reload)

    trace = commands.add_parser(
        "trace",
        help="show the life of a message from the protocol and tracking logs ([logging] dir)",
    )
    trace.add_argument(
        "query", metavar="QUEUEID|MESSAGE-ID|ADDRESS",
        help="a queue id, a Message-ID, or an address (every message from or to it)",
    )
    trace.add_argument("--since", metavar="T", help="ISO date or time (UTC unless given)")
    trace.add_argument("--until", metavar="T", help="ISO date (the whole day) or time")
    trace.add_argument("--json", action="store_true", help="print JSON Lines")
    _config_option(trace)
    trace.set_defaults(run=_trace)

    check_tls = commands.add_parser(
        "check-tls",
        help="connect to an SMTP server, STARTTLS, and check its TLS set-up and certificate",
    )
    check_tls.add_argument(
        "target", metavar="HOST[:PORT]",
        help="the server, e.g. mx1.example.com or 192.0.2.25:587 (port 25 by default; on port"
             " 465, TLS starts at once instead of with STARTTLS)",
    )
    _trust_options(check_tls, "[dns] nameservers (to find HOST)")
    check_tls.add_argument(
        "--servername", metavar="NAME",
        help="the name the certificate must cover, also sent as SNI (default: HOST)",
    )
    check_tls.add_argument(
        "--implicit", action="store_true", help=argparse.SUPPRESS,  # TLS at once on any port
    )
    check_tls.set_defaults(run=_check_tls_command)

    diagnose = commands.add_parser(
        "diagnose",
        help="check a domain's mail set-up: MX, each MX's TLS, SPF, DKIM, DMARC, MTA-STS",
    )
    diagnose.add_argument("domain", metavar="DOMAIN", help="the mail domain, e.g. example.com")
    diagnose.add_argument(
        "--selector", metavar="S", help="also check the DKIM key at S._domainkey.DOMAIN"
    )
    _trust_options(diagnose, "[dns] nameservers and timeout, [delivery] mx_port")
    diagnose.set_defaults(run=_diagnose_command)
    return parser


def _trust_options(command, uses):
    command.add_argument(
        "--ca-file", metavar="F",
        help="trust the CAs in this PEM file (default: [tls] ca_file of --config, else the"
             " system's trust store)",
    )
    command.add_argument(
        "--config", metavar="FILE",
        help="use this configuration's %s, [tls] ca_file and [gateway] hostname (for EHLO)"
             % (uses,),
    )
    command.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=None,
        help="give up on each network step after this long (default: 10)",
    )


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


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("expected seconds, e.g. 10, got %r" % (text,))
    return value


def _diagnostic_setup(args):
    """
    (config or None, CA file or None, timeout, EHLO name) for check-tls and diagnose; raises
    ConfigError or ValueError (one line for _fail).
    """
    from mailgate.ops import checktls  # only the diagnostic commands need it

    config = load_config(args.config) if args.config else None
    cafile = args.ca_file or (config.tls.ca_file if config is not None else None)
    try:
        checktls.check_trust_store(cafile)
    except checktls.TrustStoreError as e:
        option = "--ca-file" if args.ca_file else "[tls] ca_file"
        raise ValueError("%s: %s" % (option, e)) from None
    timeout = args.timeout or checktls.DEFAULT_TIMEOUT
    ehlo = config.gateway.hostname if config is not None else checktls.default_ehlo_name()
    return config, cafile, timeout, ehlo


def _lookups(config):
    """Blocking DNS for the diagnostic commands: [dns] nameservers only, when configured."""
    from mailgate.ops.diagnose import Lookups

    return Lookups.from_config(config.dns if config is not None else None)


def _print_findings(findings):
    from mailgate.ops.checktls import exit_status

    for finding in findings:
        _print(finding.line())
    return exit_status(findings)


def _check_tls_command(args):
    from mailgate.ops import checktls

    try:
        host, port = checktls.parse_target(args.target)
        if args.servername is not None and not is_ip_address(args.servername):
            _dns_name("a host name like mx.example.com", args.servername, False)
        config, cafile, timeout, ehlo = _diagnostic_setup(args)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    # The system's resolver (getaddrinfo: /etc/hosts too) unless the config names nameservers.
    lookups = _lookups(config) if config is not None and config.dns.nameservers else None
    findings = checktls.check_host(
        host, port, servername=args.servername or host, cafile=cafile,
        implicit=True if args.implicit else None, timeout=timeout, ehlo_name=ehlo,
        lookups=lookups,
    )
    return _print_findings(findings)


def _diagnose_command(args):
    from mailgate.ops import diagnose

    try:
        domain = args.domain
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError("expected a domain like example.com, got %r" % (args.domain,))
        domain = _dns_name("a domain like example.com", domain, False).lower()
        selector = None
        if args.selector is not None:
            selector = _dns_name("a selector like mail2024", args.selector, True)
        config, cafile, timeout, ehlo = _diagnostic_setup(args)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    findings = diagnose.diagnose(
        domain, _lookups(config),
        mx_port=config.delivery.mx_port if config is not None else 25,
        selector=selector, cafile=cafile, timeout=timeout, ehlo_name=ehlo,
    )
    return _print_findings(findings)


def _passwd(args):
    from mailgate.smtp.auth import set_user  # only this subcommand needs it

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
    from mailgate.delivery import dkimsign  # only this subcommand needs it

    try:
        domain = _dns_name("a domain like example.com", args.domain, False).lower()
        selector = _dns_name("a selector like mail2024", args.selector, True)
        if args.bits is not None and args.key_type != "rsa":
            raise ValueError("--bits is for rsa keys only")
    except ValueError as e:
        return _fail(str(e))
    try:
        # A directory for private keys: made for the owner alone when it is new.
        os.makedirs(args.out, mode=0o700, exist_ok=True)
    except OSError as e:
        return _fail("%s: %s" % (e.filename or args.out, e.strerror or e))
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


def _trace(args):
    from mailgate.ops import trace  # only this subcommand needs it

    try:
        return trace.run(args, _print)
    except (ConfigError, trace.TraceError) as e:
        return _fail(str(e))
    except BrokenPipeError:  # e.g. | head: the reader has seen enough
        try:  # and no second complaint when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


def _config_option(command):
    command.add_argument(
        "--config", metavar="FILE",
        help="the gateway's ini file (default: $MAILGATE_CONFIG, then %s)" % DEFAULT_CONFIG,
    )


def _queue(args):
    from mailgate.ops import admin  # only the queue and reload commands need it

    return admin.cli_queue(args, _print, _fail)


def _db_upgrade(args):
    from mailgate.config import config_file
    from mailgate.queue import migrations
    from mailgate.queue.claims import QueueUnavailable

    path = config_file(args.config)
    try:
        config = load_config(path)
    except ConfigError as e:
        return _fail(str(e))
    if config.queue.backend != "postgresql":
        return _fail("%s: [queue] backend is %s: there is no database to upgrade"
                     % (path, config.queue.backend))
    try:
        before, after = migrations.upgrade_database(config.queue, say=_print)
    except (QueueUnavailable, ValueError) as e:
        return _fail(str(e))
    if before == after:
        _print("database schema is at version %d: nothing to do" % (after,))
    else:
        _print("database schema upgraded from version %d to %d" % (before, after))
    return 0


def _reload(args):
    from mailgate.ops import admin

    return admin.cli_reload(args, _print, _fail)


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
