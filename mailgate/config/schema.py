"""
The building blocks of the schema: a Key (kind, default, documentation) per ini key, a Section
per kind of ini section.  The section modules define their tables with these; the loader,
render_config and the reference read them.  A default is the text of a value, or a callable
(values of this section so far, config values built so far) -> value; sections are built in
SECTIONS order, so a default may come from an earlier section.
"""

import attr

REQUIRED = object()


@attr.s(frozen=True)
class Key:
    """
    One ini key, defined once with its documentation, from which the README's reference table is
    generated (mailgate.config.reference).  kind parses and renders the value; default is its
    text, REQUIRED, or a callable (see above).  doc: what the key means (markdown); example: a
    value, shown as "Example: `key = value`" after doc; type: the kind in words (the kind's
    describe() unless given); default_doc: the default in words, where it is computed or its
    text alone does not say what it means.
    """

    kind = attr.ib()
    default = attr.ib(default=REQUIRED)
    doc = attr.ib(default="", kw_only=True)
    example = attr.ib(default=None, kw_only=True)
    type = attr.ib(
        default=attr.Factory(lambda key: key.kind.describe(), takes_self=True), kw_only=True
    )
    default_doc = attr.ib(default=None, kw_only=True)


@attr.s(frozen=True)
class Section:
    """
    How ini sections become one Config field.  A named section is written [KIND:NAME] any number
    of times and becomes a tuple; build(name, values) makes the value, flatten(value) undoes it
    (-> (name, values)) for render_config; check(values) -> (key, message) or None.  A section
    with an any_key takes keys that are not in keys (none is then): its values are the given str
    values, in file order, and any_key is a Key that documents them.
    """

    field = attr.ib()
    keys = attr.ib()
    build = attr.ib()
    flatten = attr.ib()
    check = attr.ib(default=None)
    named = attr.ib(default=False)
    any_key = attr.ib(default=None)

    @property
    def any_keys(self):
        return self.any_key is not None


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
