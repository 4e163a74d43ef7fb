"""
The README's configuration reference tables, generated from the schema (each Key's doc, example,
type and default), so that the documentation of a key lives next to its definition.  README.md
marks each generated table with <!-- keys:KIND --> ... <!-- /keys -->; a test checks that each
is this module's output.

    python -m mailgate.config.reference            # print every table, between its markers
    python -m mailgate.config.reference README.md  # rewrite the marked tables in README.md
"""

import re
import sys

from mailgate.config.schema import REQUIRED
from mailgate.config.sections import SECTIONS

HEADER = "| Key | Type | Default | Meaning |\n|-----|------|---------|---------|"
BLOCK = re.compile(r"<!-- keys:([a-z]+) -->\n(.*?)<!-- /keys -->", re.S)


def default_doc(key):
    """The Default column: the default in words, or its text."""
    if key.default_doc is not None:
        return key.default_doc
    if key.default is REQUIRED:
        return "required"
    if callable(key.default):
        raise ValueError("a computed default needs a default_doc")
    if key.default == "":
        return key.kind.EMPTY
    return "`%s`" % key.default


def rows(kind):
    """[(names, type, default, meaning)] of a section; keys alike in all three share one row."""
    section = SECTIONS[kind]
    found = []  # [[names, type, default, doc, examples]]
    keys = list(section.keys.items())
    if section.any_key is not None:
        keys.append((None, section.any_key))
    for name, key in keys:
        try:
            if not key.doc:
                raise ValueError("no doc")
            cells = [key.type, default_doc(key), key.doc]
        except ValueError as e:
            raise ValueError("[%s] %s: %s" % (kind, name, e)) from None
        example = None if key.example is None or name is None else "`%s = %s`" % (name, key.example)
        if found and found[-1][1:4] == cells and name is not None:
            found[-1][0].append(name)
        else:
            found.append([[name]] + cells + [[]])
        if example:
            found[-1][4].append(example)
    table = []
    for names, type_, default, doc, examples in found:
        meaning = doc + ("  Example: " + ", ".join(examples) if examples else "")
        names = ", ".join("any key" if name is None else "`%s`" % name for name in names)
        table.append((names, type_, default, meaning))
    return table


def table(kind):
    """The markdown table of the keys of SECTIONS[kind]."""
    lines = [HEADER]
    for cells in rows(kind):
        for cell in cells:
            if "\n" in cell:
                raise ValueError("[%s]: a table cell may not hold a newline: %r" % (kind, cell))
        # A "|" (an LDAP filter's "or") is escaped: GitHub's tables show "\|" as "|", in code too.
        lines.append("| %s |" % " | ".join(cell.replace("|", "\\|") for cell in cells))
    return "\n".join(lines) + "\n"


def block(kind):
    """The table between its markers, blank lines around it so that markdown ends it there."""
    return "<!-- keys:%s -->\n\n%s\n<!-- /keys -->" % (kind, table(kind))


def blocks(text):
    """{kind: the text between its markers} of a document (README.md)."""
    found = {}
    for match in BLOCK.finditer(text):
        if match.group(1) in found:
            raise ValueError("<!-- keys:%s --> is there twice" % match.group(1))
        found[match.group(1)] = match.group(2)
    return found


def update(text):
    """text with every marked table generated again."""
    unknown = sorted(set(blocks(text)) - set(SECTIONS))
    if unknown:
        raise ValueError("<!-- keys:%s -->: no such section" % unknown[0])
    return BLOCK.sub(lambda match: block(match.group(1)), text)


def main(argv):
    if not argv:
        print("\n\n".join(block(kind) for kind in SECTIONS))
        return 0
    [path] = argv
    with open(path, encoding="utf-8") as f:
        text = f.read()
    missing = [kind for kind in SECTIONS if kind not in blocks(text)]
    if missing:
        print("%s: no <!-- keys:KIND --> block for %s" % (path, ", ".join(missing)),
              file=sys.stderr)
        return 1
    new = update(text)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    print("%s: %s" % (path, "tables written" if new != text else "tables up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
