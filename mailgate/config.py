"""
The gateway's configuration: the ini file is read and validated here, once, into frozen values.

No other module reads the ini.  Every problem is a mailgate.errors.ConfigError naming the file,
section and key.  Relative paths in a config file are relative to the directory holding that file.
"""

import attr

# ---------------------------------------------------------------------------------------------
# The typed values (the contract other modules rely on).  Sizes are ints (bytes), durations are
# floats (seconds), CIDR lists are tuples of ipaddress.ip_network objects, paths are absolute str.
# ---------------------------------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class Limits:
    max_auth_failures = attr.ib(default=3)
    max_errors = attr.ib(default=10)
    command_timeout = attr.ib(default=300.0)
    data_timeout = attr.ib(default=600.0)
    session_timeout = attr.ib(default=1800.0)


@attr.s(frozen=True, slots=True)
class GatewayConfig:
    hostname = attr.ib()
    accepted_domains = attr.ib(default=())  # tuple of lower-case str
    max_message_size = attr.ib(default=35 * 1024 * 1024)


@attr.s(frozen=True, slots=True)
class QueueConfig:
    backend = attr.ib(default="spool")
    path = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class TLSConfig:
    certificate = attr.ib(default=None)
    private_key = attr.ib(default=None)
    min_version = attr.ib(default="TLSv1.2")  # "TLSv1.2" or "TLSv1.3"
    generate_self_signed = attr.ib(default=False)


@attr.s(frozen=True, slots=True)
class AuthConfig:
    users_file = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class ListenerConfig:
    name = attr.ib()
    endpoint = attr.ib()
    role = attr.ib()  # "submission" | "relay"
    tls = attr.ib()  # "none" | "optional" | "required" | "implicit"
    auth = attr.ib()  # "none" | "optional" | "required"
    allowed_ips = attr.ib(default=())  # empty tuple: every address
    relay_ips = attr.ib(default=())
    max_message_size = attr.ib(default=35 * 1024 * 1024)
    max_recipients = attr.ib(default=100)
    limits = attr.ib(factory=Limits)


@attr.s(frozen=True, slots=True)
class Config:
    path = attr.ib()  # absolute path of the ini file it came from
    gateway = attr.ib()
    limits = attr.ib()
    queue = attr.ib()
    tls = attr.ib()
    auth = attr.ib()
    listeners = attr.ib()  # tuple of ListenerConfig, in file order
