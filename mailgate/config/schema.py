"""
The building blocks of the schema: a Key (kind, default) per ini key, a Section per kind of ini
section.  The section modules define their tables with these; the loader and render_config read
them.  A default is the text of a value, or a callable (values of this section so far, config
values built so far) -> value; sections are built in SECTIONS order, so a default may come from
an earlier section.
"""

import attr

REQUIRED = object()


@attr.s(frozen=True)
class Key:
    kind = attr.ib()
    default = attr.ib(default=REQUIRED)


@attr.s(frozen=True)
class Section:
    """
    How ini sections become one Config field.  A named section is written [KIND:NAME] any number
    of times and becomes a tuple; build(name, values) makes the value, flatten(value) undoes it
    (-> (name, values)) for render_config; check(values) -> (key, message) or None.  A section
    with any_keys takes keys that are not in keys (none is then): its values are the given str
    values, in file order.
    """

    field = attr.ib()
    keys = attr.ib()
    build = attr.ib()
    flatten = attr.ib()
    check = attr.ib(default=None)
    named = attr.ib(default=False)
    any_keys = attr.ib(default=False)


def _plain(field, cls, keys, check=None):
    """A section that is a single attrs value with one attribute per key."""
    return Section(
        field,
        keys,
        build=lambda name, values: cls(**values),
        flatten=lambda value: (None, attr.asdict(value, recurse=False)),
        check=check,
    )


def _inherit(field, key):
    return lambda values, built: getattr(built[field], key)
