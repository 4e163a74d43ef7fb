"""
The gateway's configuration: the ini file is read and validated here, once, into frozen values.

No other module reads the ini.  Every problem is a mailgate.errors.ConfigError naming the file,
section and key.  Relative paths in a config file are relative to the directory holding that file.

Parsing is driven by SECTIONS (one table of key -> Key(kind, default, doc) per section):

    types.py      the value kinds (Int, Size, Duration, Path, Endpoint, ...), shared by sections
    schema.py     Key and Section, what a section module builds its tables from
    gateway.py    [gateway], [limits], [dns]
    listeners.py  [listener:NAME], [tls], [auth]
    directory.py  [ldap]
    queue.py      [queue]
    delivery.py   [delivery], [route:NAME], [dkim]
    filters.py    [filters], [filter:NAME], [spf], [dmarc], [attachments]
    ops.py        [logging], [metrics], [alerts], [admin]
    sections.py   Config and SECTIONS: every section, in the order they are built and rendered
    loader.py     load_config, and CHECKS (the checks spanning sections)
    render.py     render_config
    reference.py  the README's reference tables, generated from the Keys' documentation

To add a key: one Key, documented, in its section's module; a line in etc/mailgate.ini; then
`python -m mailgate.config.reference README.md` (tests check both files).  To add a section: its
frozen attrs class, key table and Section in the module of its group, a field for it in Config
and one SECTIONS entry (named=True for [KIND:NAME] sections that may repeat; they become a
tuple), and a <!-- keys:KIND --> block in the README.  Checks spanning sections go in CHECKS.

Other modules import from mailgate.config itself, which re-exports every public name.
"""

from mailgate.config.delivery import (DELIVERY_KEYS, DKIM_KEYS, ROUTE_KEYS, DeliveryConfig,
                                      DKIMConfig, RouteConfig)
from mailgate.config.directory import (LDAP_KEYS, LDAPConfig, LDAPFilterTemplate, LDAPServer,
                                       LDAPURIList)
from mailgate.config.filters import (ATTACHMENTS_KEYS, DEFAULT_BLOCKED_EXTENSIONS, DMARC_KEYS,
                                     FILTERS_KEYS, SPF_KEYS, AttachmentsConfig, DMARCConfig,
                                     FilterSection, FiltersConfig, SPFConfig)
from mailgate.config.gateway import (DNS_KEYS, GATEWAY_KEYS, LIMITS_KEYS, DNSConfig,
                                     GatewayConfig, Limits)
from mailgate.config.listeners import (AUTH_KEYS, DEFAULT_FILTERS, LISTENER_KEYS, TLS_KEYS,
                                       AuthConfig, ListenerConfig, TLSConfig)
from mailgate.config.loader import CHECKS, DEFAULT_CONFIG, config_file, load_config, load_config_text
from mailgate.config.ops import (ADMIN_KEYS, ALERTS_KEYS, LOGGING_KEYS, METRICS_KEYS, AdminConfig,
                                 AlertsConfig, LoggingConfig, MetricsConfig)
from mailgate.config.queue import QUEUE_KEYS, QueueConfig
from mailgate.config.render import HIDDEN, SECRET_KEYS, SECRET_OPTION_WORDS, render_config
from mailgate.config.schema import REQUIRED, Key, Section
from mailgate.config.sections import SECTIONS, Config
from mailgate.config.types import (BUILTIN_FILTERS, RELAY_IPS, Bool, Choice, ChoiceList, Command,
                                   DomainList, Dsn, Duration, DurationList, Endpoint, ExemptList,
                                   ExtensionList, FilterList, HeaderList, HeaderPatternList,
                                   HostList, Hostname, Int, Label, MimeTypeList, NameserverList,
                                   NetworkList, OptionalEndpoint, Path, Port, Rate, RateLimit,
                                   Ratio, RouteDomains, SecretFile, Size, Text)

__all__ = [
    # The values other modules use.
    "Config", "GatewayConfig", "Limits", "DNSConfig", "QueueConfig", "TLSConfig", "AuthConfig",
    "ListenerConfig", "LDAPConfig", "LDAPServer", "DeliveryConfig", "RouteConfig", "DKIMConfig",
    "FiltersConfig",
    "FilterSection", "SPFConfig", "DMARCConfig", "AttachmentsConfig", "LoggingConfig",
    "MetricsConfig", "AlertsConfig", "AdminConfig",
    "BUILTIN_FILTERS", "DEFAULT_FILTERS", "DEFAULT_BLOCKED_EXTENSIONS",
    # Loading and rendering.
    "DEFAULT_CONFIG", "config_file", "load_config", "load_config_text", "render_config", "CHECKS",
    "SECRET_KEYS", "SECRET_OPTION_WORDS", "HIDDEN",
    # The schema.
    "SECTIONS", "Key", "Section", "REQUIRED",
    "GATEWAY_KEYS", "LIMITS_KEYS", "DNS_KEYS", "QUEUE_KEYS", "TLS_KEYS", "AUTH_KEYS",
    "LISTENER_KEYS", "LDAP_KEYS", "DELIVERY_KEYS", "ROUTE_KEYS", "DKIM_KEYS", "FILTERS_KEYS", "SPF_KEYS",
    "DMARC_KEYS", "ATTACHMENTS_KEYS", "LOGGING_KEYS", "METRICS_KEYS", "ALERTS_KEYS", "ADMIN_KEYS",
    # The value kinds.
    "Int", "Size", "Duration", "Bool", "Choice", "Hostname", "DomainList", "NetworkList", "Path",
    "Endpoint", "Dsn", "OptionalEndpoint", "Port", "NameserverList", "HostList", "DurationList",
    "RouteDomains", "Label", "HeaderList", "Text", "SecretFile", "FilterList", "ExtensionList",
    "MimeTypeList", "Ratio", "Command", "RateLimit", "ExemptList", "Rate", "RELAY_IPS",
    "LDAPURIList", "LDAPFilterTemplate", "HeaderPatternList", "ChoiceList",
]
