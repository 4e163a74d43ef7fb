"""
render_config: a Config back to ini text, every default filled in, secrets hidden unless asked
for; what check-config prints.
"""

from mailgate.config.sections import SECTIONS

SECRET_KEYS = ("password",)
SECRET_OPTION_WORDS = ("password", "secret", "token")  # in a [filter:NAME] key: hidden
HIDDEN = "<hidden>"


def render_config(config, show_secrets=False):
    """
    The effective configuration as ini text, every default filled in.  Secrets are shown as
    <hidden> (this text ends up in tickets and chat) unless show_secrets; with them it loads back
    as is.
    """
    lines = [
        "# The effective configuration read from %s" % config.path,
        "# (every default filled in%s)" % ("" if show_secrets else "; secrets shown as " + HIDDEN),
    ]
    for kind, section in SECTIONS.items():
        value = getattr(config, section.field)
        for one in value if section.named else [value]:
            name, values = section.flatten(one)
            lines += ["", "[%s]" % (kind if name is None else "%s:%s" % (kind, name))]
            if section.any_keys:
                for key, text in values.items():
                    secret = any(word in key for word in SECRET_OPTION_WORDS)
                    lines.append(_line(key, HIDDEN if secret and not show_secrets else text))
                continue
            for key, spec in section.keys.items():
                text = spec.kind.render(values[key])
                if key in SECRET_KEYS and values[key] is not None and not show_secrets:
                    text = HIDDEN
                elif hasattr(spec.kind, "render_hidden") and not show_secrets:
                    text = spec.kind.render_hidden(values[key], HIDDEN)
                lines.append(_line(key, text))
    return "\n".join(lines) + "\n"


def _line(key, text):
    """key = text; a value of several lines continues on indented lines."""
    return ("%s = %s" % (key, text.replace("\n", "\n    "))).rstrip()
