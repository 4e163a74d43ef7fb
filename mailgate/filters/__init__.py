"""
Filters: finding them by name, and what they are given.

A listener's `filters =` names its filters in order.  A built-in name (BUILTIN) is a module of
this package whose make(context) returns the filter; any other name is a dotted path
`package.module.Attribute` to a class (or any callable) called with one argument, the dict of
options of its `[filter:NAME]` section (NAME being the dotted path as written in `filters =`; an
empty dict when there is no such section).

What comes back must be a filter: a `name` (non-empty str) and at least one callable hook of
mailgate.interfaces.IFilter (on_connect, on_helo, on_mail, on_rcpt, on_data).  Declaring
`@implementer(IFilter)` is recommended (it documents the intent; zope's verifyObject would demand
all five hooks, which a filter need not have) but not required: the check is on what the object
has, so a declared filter without a name fails too.
Anything that cannot be loaded is a mailgate.errors.ConfigError naming the listener and its
`filters` key, in one line.

The chain that runs the filters is mailgate.filters.chain.FilterChain; build_chain() makes one for
a listener.
"""

import importlib
from collections.abc import Mapping

import attr

from mailgate.errors import ConfigError

BUILTIN = {
    "spf": "mailgate.filters.spf",
    "dkim": "mailgate.filters.dkim",
    "dmarc": "mailgate.filters.dmarc",
    "attachments": "mailgate.filters.attachments",
}

HOOKS = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data")


@attr.s(frozen=True, slots=True)
class FilterContext:
    """
    What filters and the chain get from the gateway.  config: the whole mailgate.config.Config;
    reactor: for callLater/seconds (the chain's timeouts) and callFromThread; resolver: the
    gateway's twisted.names IResolver (cached, honours [dns]); run_in_thread: f, *args -> a
    Deferred firing with f(*args) run in the gateway's thread pool (for CPU-heavy or blocking
    work such as parsing a large message); events: the gateway's mailgate.events.EventBus, or None.
    When events is set, the chain emits one "verdict" event per verdict (see
    mailgate.filters.chain), which mailgate.ops.metrics counts.
    """

    config = attr.ib()
    reactor = attr.ib()
    resolver = attr.ib(default=None)
    run_in_thread = attr.ib(default=None)
    events = attr.ib(default=None)


def section_options(sections):
    """
    {NAME: {key: value}} from config.filter_sections (a sequence of mailgate.config.FilterSection)
    or from a mapping already in that shape (copied).
    """
    if sections is None:
        return {}
    if isinstance(sections, Mapping):
        return {name: dict(options) for name, options in sections.items()}
    return {section.name: dict(section.options) for section in sections}


def _one_line(text):
    return " ".join(str(text).split())


def _reason(error):
    message = _one_line(error)
    return "%s: %s" % (type(error).__name__, message) if message else type(error).__name__


def check_filter(obj):
    """None when obj looks like a filter, else why not (str)."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return "%r has no name (a non-empty str)" % (obj,)
    if not any(callable(getattr(obj, hook, None)) for hook in HOOKS):
        return "%r has none of the hooks %s" % (obj, ", ".join(HOOKS))
    return None


def _resolve(path):
    module_name, dot, attribute = path.rpartition(".")
    if not dot or not module_name or not attribute:
        raise ValueError("not a built-in filter (%s) nor a dotted path package.module.Class"
                         % ", ".join(sorted(BUILTIN)))
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


def load_filter(name, context, options):
    """One filter by name (see the module docstring).  Raises the loader's exceptions as they come."""
    if name in BUILTIN:
        obj = importlib.import_module(BUILTIN[name]).make(context)
    else:
        obj = _resolve(name)(dict(options))
    problem = check_filter(obj)
    if problem is not None:
        raise TypeError(problem)
    return obj


def load_filters(names, context, sections=None, listener=None):
    """
    The filters named by names, in order.  sections: {NAME: {key: value}} (or
    config.filter_sections); listener: the listener's name, for errors.  A ConfigError raised by a
    filter itself passes through; any other failure (ImportError, AttributeError, an exception
    from the constructor, an object that is not a filter) becomes
    ConfigError(config.path, "listener:NAME", "filters", "cannot load NAME: REASON").
    """
    options = section_options(sections)
    filters = []
    for name in names:
        try:
            filters.append(load_filter(name, context, options.get(name, {})))
        except ConfigError:
            raise
        except Exception as e:
            section = "listener:%s" % (listener,) if listener is not None else None
            raise ConfigError(getattr(context.config, "path", None), section, "filters",
                              "cannot load %s: %s" % (_one_line(name), _reason(e))) from e
    return filters


def build_chain(listener, context):
    """The FilterChain for a mailgate.config.ListenerConfig: its filters, [filter:NAME] options."""
    from mailgate.filters.chain import FilterChain

    config = context.config
    filters = load_filters(listener.filters, context, config.filter_sections, listener.name)
    return FilterChain(filters, context, config.gateway.hostname)
