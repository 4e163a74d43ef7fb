"""
The whole schema in one place: the Config value (one field per section) and SECTIONS, the order
in which sections are built, checked and rendered.  A section's keys live in its own module.
"""

import attr

from mailgate.config import delivery, directory, filters, gateway, listeners, ops, queue
from mailgate.config.delivery import DeliveryConfig, DKIMConfig
from mailgate.config.filters import AttachmentsConfig, DMARCConfig, FiltersConfig, SPFConfig
from mailgate.config.directory import LDAPConfig
from mailgate.config.gateway import DNSConfig
from mailgate.config.ops import AdminConfig, AlertsConfig, LoggingConfig, MetricsConfig


@attr.s(frozen=True, slots=True)
class Config:
    path = attr.ib()  # absolute path of the ini file it came from
    gateway = attr.ib()
    limits = attr.ib()
    queue = attr.ib()
    tls = attr.ib()
    auth = attr.ib()
    listeners = attr.ib()  # tuple of ListenerConfig, in file order
    ldap = attr.ib(factory=LDAPConfig)
    dns = attr.ib(factory=DNSConfig)
    delivery = attr.ib(factory=DeliveryConfig)
    routes = attr.ib(default=())  # tuple of RouteConfig, in file order
    dkim = attr.ib(factory=DKIMConfig)
    filters = attr.ib(factory=FiltersConfig)
    filter_sections = attr.ib(default=())  # tuple of FilterSection
    spf = attr.ib(factory=SPFConfig)
    dmarc = attr.ib(factory=DMARCConfig)
    attachments = attr.ib(factory=AttachmentsConfig)
    logging = attr.ib(factory=LoggingConfig)
    metrics = attr.ib(factory=MetricsConfig)
    alerts = attr.ib(factory=AlertsConfig)
    admin = attr.ib(factory=AdminConfig)


SECTIONS = {
    "gateway": gateway.GATEWAY,
    "limits": gateway.LIMITS,
    "queue": queue.QUEUE,
    "tls": listeners.TLS,
    "auth": listeners.AUTH,
    "ldap": directory.LDAP,
    "listener": listeners.LISTENER,
    "dns": gateway.DNS,
    "delivery": delivery.DELIVERY,
    "route": delivery.ROUTE,
    "dkim": delivery.DKIM,
    "filters": filters.FILTERS,
    "spf": filters.SPF,
    "dmarc": filters.DMARC,
    "attachments": filters.ATTACHMENTS,
    "filter": filters.FILTER,
    "logging": ops.LOGGING,
    "metrics": ops.METRICS,
    "alerts": ops.ALERTS,
    "admin": ops.ADMIN,
}
