"""
[logging], [metrics], [alerts] and [admin]: what the gateway tells its operators, and the local
channel they command it by.
"""

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import Command, Duration, Int, OptionalEndpoint, Path, Ratio, Size


@attr.s(frozen=True, slots=True)
class LoggingConfig:
    dir = attr.ib(default=None)  # None: no protocol.log / tracking.log
    max_size = attr.ib(default=100 * 1024 * 1024)  # rotate a log past this size (and daily)
    retention_days = attr.ib(default=30)


@attr.s(frozen=True, slots=True)
class MetricsConfig:
    endpoint = attr.ib(default=None)  # a Twisted server endpoint string; None: off


@attr.s(frozen=True, slots=True)
class AlertsConfig:
    interval = attr.ib(default=30.0)
    queue_size = attr.ib(default=0)  # messages; 0: off
    oldest_message_age = attr.ib(default=0.0)  # seconds; 0: off
    deferred_ratio = attr.ib(default=0.0)  # deferred / all queued, 0..1; 0: off
    connection_timeouts_per_minute = attr.ib(default=0)  # 0: off
    command = attr.ib(default=None)  # run with the alert's details in its environment


@attr.s(frozen=True, slots=True)
class AdminConfig:
    socket = attr.ib(default=None)  # path of the admin unix socket; None: <queue path>/admin.sock


LOGGING_KEYS = {
    "dir": Key(Path(), ""),
    "max_size": Key(Size(), "100M"),
    "retention_days": Key(Int(1), "30"),
}

METRICS_KEYS = {
    "endpoint": Key(OptionalEndpoint(), ""),
}

ALERTS_KEYS = {
    "interval": Key(Duration(), "30s"),
    "queue_size": Key(Int(0), "0"),
    "oldest_message_age": Key(Duration(positive=False), "0"),
    "deferred_ratio": Key(Ratio(), "0"),
    "connection_timeouts_per_minute": Key(Int(0), "0"),
    "command": Key(Command(), ""),
}

ADMIN_KEYS = {
    "socket": Key(Path(), ""),
}

LOGGING = _plain("logging", LoggingConfig, LOGGING_KEYS)
METRICS = _plain("metrics", MetricsConfig, METRICS_KEYS)
ALERTS = _plain("alerts", AlertsConfig, ALERTS_KEYS)
ADMIN = _plain("admin", AdminConfig, ADMIN_KEYS)
