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
    "dir": Key(
        Path(), "",
        doc="The directory for `protocol.log` and `tracking.log` (JSON Lines); not set: no such "
        "logs.",
        example="/var/log/mailgate",
    ),
    "max_size": Key(
        Size(), "100M",
        doc="Rotate a log past this size (it is also rotated daily, at midnight UTC).",
        example="1G",
    ),
    "retention_days": Key(
        Int(1), "30", doc="Delete rotated logs older than this many days.", example="90"
    ),
}

METRICS_KEYS = {
    "endpoint": Key(
        OptionalEndpoint(), "",
        doc="The Twisted endpoint string serving `/metrics` (Prometheus) and `/healthz`; not "
        "set: off.  Keep it on loopback or a management network.",
        example="tcp:9025:interface=127.0.0.1",
    ),
}

ALERTS_KEYS = {
    "interval": Key(Duration(), "30s", doc="How often to check.", example="1m"),
    "queue_size": Key(Int(0), "0", doc="Messages queued, all states.", example="10000"),
    "oldest_message_age": Key(
        Duration(positive=False), "0", doc="The age of the oldest queued message.", example="1h"
    ),
    "deferred_ratio": Key(
        Ratio(), "0", doc="Deferred messages as a share of all queued ones (0 to 1).",
        example="0.5",
    ),
    "connection_timeouts_per_minute": Key(
        Int(0), "0", doc="SMTP sessions closed for a timeout in the last minute.", example="20"
    ),
    "command": Key(
        Command(), "",
        doc="Run by `/bin/sh` when an alert fires or clears, with `MAILGATE_ALERT`, "
        "`MAILGATE_ALERT_STATE` (`firing`/`cleared`), `MAILGATE_ALERT_VALUE`, "
        "`MAILGATE_ALERT_THRESHOLD` set.",
        example="/usr/local/bin/page-oncall",
    ),
}

ADMIN_KEYS = {
    "socket": Key(
        Path(), "",
        default_doc="`admin.sock` in the `[queue] path`",
        doc="The local admin channel (unix socket, owner only) used by `mailgate queue` and "
        "`mailgate reload`.",
        example="/run/mailgate/admin.sock",
    ),
}

LOGGING = _plain("logging", LoggingConfig, LOGGING_KEYS)
METRICS = _plain("metrics", MetricsConfig, METRICS_KEYS)
ALERTS = _plain("alerts", AlertsConfig, ALERTS_KEYS)
ADMIN = _plain("admin", AdminConfig, ADMIN_KEYS)
