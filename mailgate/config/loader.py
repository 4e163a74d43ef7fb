"""
load_config: the ini file read (at most 1M of UTF-8), parsed against SECTIONS and checked, section
by section and then across sections (CHECKS), into one frozen Config.  Every problem is one
mailgate.errors.ConfigError naming the file, section and key.
"""

import ast
import configparser
import os
import re

from mailgate.config.schema import REQUIRED
from mailgate.config.sections import SECTIONS, Config
from mailgate.config.types import (BUILTIN_FILTERS, _file_problem, has_entries,
                                   private_file_problem)
from mailgate.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_FILE_SIZE = 1024 * 1024


DEFAULT_CONFIG = "/etc/mailgate/mailgate.ini"


def config_file(option=None):
    """Which config the commands use: --config, else $MAILGATE_CONFIG, else DEFAULT_CONFIG."""
    return option or os.environ.get("MAILGATE_CONFIG") or DEFAULT_CONFIG


def load_config(path):
    """Read, parse and check the ini file at path; every problem is one ConfigError."""
    return _load(path, _read(path))


def load_config_text(text, path):
    """
    The same for ini text said to come from path (relative paths are taken from there): a
    receiver process gets the running configuration this way, rendered by the main process.
    """
    return _load(path, _parse(path, text))


def _load(path, parser):
    base = os.path.dirname(os.path.abspath(path))
    found = {kind: [] for kind in SECTIONS}
    for name in parser.sections():
        kind, instance = _classify(path, name)
        found[kind].append((name, instance))
    built = {}
    for kind, section in SECTIONS.items():
        if section.named:
            built[section.field] = tuple(
                section.build(instance, _values(path, base, parser, name, section, built))
                for name, instance in found[kind]
            )
        else:
            values = _values(path, base, parser, kind, section, built)
            built[section.field] = section.build(None, values)
    config = Config(path=os.path.abspath(path), **built)
    for check in CHECKS:
        check(path, config)
    return config


def _read(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read(_MAX_FILE_SIZE + 1)
    except OSError as e:
        raise ConfigError(path, None, None, "cannot read: %s" % (e.strerror or e,))
    except UnicodeDecodeError as e:
        message = "cannot read: not UTF-8 text (byte 0x%02x at offset %d)"
        message %= (e.object[e.start], e.start)
        raise ConfigError(path, None, None, message)
    except ValueError as e:
        raise ConfigError(path, None, None, "cannot read: %s" % (e,))
    if len(text) > _MAX_FILE_SIZE:
        raise ConfigError(path, None, None, "cannot read: larger than 1M, not a config file")
    return _parse(path, text)


def _parse(path, text):
    parser = configparser.ConfigParser(
        interpolation=None,
        strict=True,
        default_section="\0",  # so that [DEFAULT] is an unknown section, not a silent fallback
        inline_comment_prefixes=("#",),
        empty_lines_in_values=False,
    )
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, "duplicate section (line %s)" % (e.lineno,))
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, "duplicate key (line %s)" % (e.lineno,))
    except configparser.MissingSectionHeaderError as e:
        message = "line %d: %r is not inside a [section]" % (e.lineno, e.line.strip())
        raise ConfigError(path, None, None, message)
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        message = "line %d: expected 'key = value', got %r" % (lineno, _unrepr(line).strip())
        raise ConfigError(path, None, None, message)
    except configparser.Error as e:
        raise ConfigError(path, None, None, str(e).splitlines()[0])
    return parser


def _unrepr(line):
    """ParsingError keeps repr(line) in some Python versions and the line in others."""
    try:
        value = ast.literal_eval(line)
    except Exception:  # not a literal at all: the line itself
        return line
    return value if isinstance(value, str) else line


def _classify(path, name):
    """-> (SECTIONS key, instance name or None) for a section name as written."""
    if name in SECTIONS and not SECTIONS[name].named:
        return name, None
    kind, _, instance = name.partition(":")
    if kind not in SECTIONS or not SECTIONS[kind].named:
        raise ConfigError(path, name, None, "unknown section")
    if not _NAME.fullmatch(instance):
        message = "expected [%s:NAME], NAME made of letters, digits, '_', '.' and '-'" % kind
        raise ConfigError(path, name, None, message)
    return kind, instance


def _values(path, base, parser, name, section, built):
    """The typed values of one section (all defaults filled in), checked."""
    given = dict(parser.items(name, raw=True)) if parser.has_section(name) else {}
    if section.any_keys:
        return given  # keys lower-cased by configparser, in file order; values str as written
    for key in given:
        if key not in section.keys:
            raise ConfigError(path, name, key, "unknown key")
    values = {}
    for key, spec in section.keys.items():
        try:
            values[key] = _value(base, spec, key, given, values, built)
        except ValueError as e:
            raise ConfigError(path, name, key, str(e))
    problem = section.check(values) if section.check else None
    if problem:
        raise ConfigError(path, name, *problem)
    return values


def _value(base, spec, key, given, values, built):
    if key in given:
        return spec.kind.parse(given[key], base)
    if spec.default is REQUIRED:
        raise ValueError("required, but not set")
    if callable(spec.default):
        return spec.default(values, built)
    return spec.kind.parse(spec.default, base)


# ---------------------------------------------------------------------------------------------
# Checks across sections, run in order once every section is built: each is (file, config).
# ---------------------------------------------------------------------------------------------


def _check_listeners(path, config):
    if not config.listeners:
        raise ConfigError(path, None, None, "no [listener:NAME] section: at least one is required")
    seen = {}
    for listener in config.listeners:
        first = seen.setdefault(listener.endpoint, listener.name)
        if first != listener.name:
            message = "same endpoint as [listener:%s]" % first
            raise ConfigError(path, "listener:" + listener.name, "endpoint", message)


def _check_tls(path, config):
    users = [listener for listener in config.listeners if listener.tls != "none"]
    keys = ("certificate", "private_key")
    for key in keys:
        if getattr(config.tls, key) is None and users:
            message = "required, because [listener:%s] has tls = %s" % (users[0].name, users[0].tls)
            raise ConfigError(path, "tls", key, message)
    for key in keys:
        value = getattr(config.tls, key)
        if value is not None and not config.tls.generate_self_signed:
            _check_readable(path, "tls", key, value, private=key == "private_key")
        elif value is not None and key == "private_key" and os.path.exists(value):
            _check_readable(path, "tls", key, value, private=True)
    if config.tls.ca_file is not None:
        _check_readable(path, "tls", "ca_file", config.tls.ca_file)


def _check_auth(path, config):
    users = [listener for listener in config.listeners if listener.auth != "none"]
    value = config.auth.users_file
    if value is None and users and "file" in config.auth.backend:
        message = "required, because [listener:%s] has auth = %s" % (users[0].name, users[0].auth)
        raise ConfigError(path, "auth", "users_file", message)
    if value is not None:
        _check_readable(path, "auth", "users_file", value, private=has_entries)


def _check_ldap(path, config):
    """[ldap] is complete when something uses it; its files are readable."""
    users = ["[listener:%s] has recipients = ldap" % listener.name
             for listener in config.listeners if listener.recipients == "ldap"]
    if "ldap" in config.auth.backend:
        users.append("[auth] backend names ldap")
    if users and not config.ldap.servers:
        raise ConfigError(path, "ldap", "uri", "required, because %s" % users[0])
    for key in ("bind_password_file", "ca_file"):
        value = getattr(config.ldap, key)
        if value is not None:
            _check_readable(path, "ldap", key, value)


def _check_client_certs(path, config):
    users = [listener for listener in config.listeners if listener.relay_client_certs]
    if users and config.tls.client_ca_file is None:
        message = "required, because [listener:%s] has relay_client_certs" % users[0].name
        raise ConfigError(path, "tls", "client_ca_file", message)
    if config.tls.client_ca_file is not None:
        _check_readable(path, "tls", "client_ca_file", config.tls.client_ca_file)


def _check_routes(path, config):
    """A domain entry may be in one route only ("*" included)."""
    seen = {}
    for route in config.routes:
        for domain in route.domains:
            first = seen.setdefault(domain, route.name)
            if first != route.name:
                message = "%s is already in [route:%s]" % (domain, first)
                raise ConfigError(path, "route:" + route.name, "domains", message)


def _check_dkim(path, config):
    if config.dkim.private_key is not None:
        _check_readable(path, "dkim", "private_key", config.dkim.private_key, private=True)


def _check_readable(path, section, key, filename, private=False):
    """
    A readable file; private: a secret, which only its owner and group may read (or a function
    saying whether this file holds a secret at all).
    """
    problem = _file_problem(filename)
    if not problem and private:
        problem = private_file_problem(filename, private if callable(private) else None)
    if problem:
        raise ConfigError(path, section, key, problem)


def _check_filter_sections(path, config):
    """A [filter:NAME] is for a filter some listener uses, and never for a built-in one."""
    used = {name for listener in config.listeners for name in listener.filters}
    for section in config.filter_sections:
        if section.name.lower() in BUILTIN_FILTERS:
            message = "built-in filters are configured in [spf], [dmarc], [attachments]"
            raise ConfigError(path, "filter:" + section.name, None, message)
        if section.name not in used:
            message = "not used by any listener's filters"
            raise ConfigError(path, "filter:" + section.name, None, message)


CHECKS = [
    _check_listeners, _check_tls, _check_auth, _check_ldap, _check_client_certs, _check_routes,
    _check_dkim, _check_filter_sections,
]
