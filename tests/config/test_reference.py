"""
The schema's documentation: a key added to the schema must be documented in both places, the
README's configuration reference (generated from the Keys by mailgate.config.reference) and the
commented example etc/mailgate.ini, and neither may drift from it.
"""

import os
import re

import attr
import pytest

from mailgate.config import SECTIONS, Key, Section, load_config
from mailgate.config import reference
from mailgate.config.schema import REQUIRED
from mailgate.config.types import Int, Path, SecretFile

from tests import REPO

EXAMPLE = os.path.join(REPO, "etc", "mailgate.ini")
REGENERATE = "run `python -m mailgate.config.reference README.md` to write it again from the schema"


def readme_blocks():
    """{kind: text} of the README's <!-- keys:KIND --> ... <!-- /keys --> blocks."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    found = re.findall(r"^<!-- keys:(\S+) -->\n(.*?)^<!-- /keys -->$", readme, re.M | re.S)
    kinds = [kind for kind, _ in found]
    assert len(kinds) == len(set(kinds)), "a <!-- keys:KIND --> block is in README.md twice"
    return dict(found)


# --- README.md ---------------------------------------------------------------------------------


def test_every_section_has_a_table_in_the_readme():
    """Under its own heading: ### `[KIND]`, or ### `[KIND:NAME]` for a named section."""
    blocks = readme_blocks()
    missing = [kind for kind in SECTIONS if kind not in blocks]
    assert missing == [], "README.md has no <!-- keys:KIND --> table for %s: %s" % (
        missing, REGENERATE)
    assert sorted(set(blocks) - set(SECTIONS)) == [], "README.md tables of unknown sections"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for kind, section in SECTIONS.items():
        before = readme[:readme.index("<!-- keys:%s -->" % kind)]
        heading = before[before.rindex("\n### "):].splitlines()[1]
        assert heading == "### `[%s%s]`" % (kind, ":NAME" if section.named else ""), kind


@pytest.mark.parametrize("kind", list(SECTIONS))
def test_readme_table_is_generated_from_the_schema(kind):
    block = readme_blocks().get(kind)
    assert block is not None, "README.md has no table for [%s]: %s" % (kind, REGENERATE)
    assert block == "\n" + reference.table(kind) + "\n", (
        "README.md's table of [%s] is not the schema's: %s" % (kind, REGENERATE))


def test_every_key_is_documented():
    for kind, section in SECTIONS.items():
        keys = dict(section.keys, **({"(any key)": section.any_key} if section.any_keys else {}))
        assert keys, kind
        for name, key in keys.items():
            assert key.doc and key.type, (kind, name)
            assert key.doc.endswith((".", "`")), (kind, name, "ends a sentence or an example")
            if callable(key.default):
                assert key.default_doc, (kind, name, "a computed default says what it is")


def test_every_example_is_a_valid_value(tmp_path):
    """
    The "Example: `key = value`" of each key parses as that key's kind (a password_file example
    names a file that is not here: it must be a path).
    """
    for kind, section in SECTIONS.items():
        for name, key in section.keys.items():
            if key.example is not None:
                parser = Path() if isinstance(key.kind, SecretFile) else key.kind
                try:
                    parser.parse(key.example, str(tmp_path))
                except ValueError as e:
                    pytest.fail("[%s] %s example %r: %s" % (kind, name, key.example, e))


def test_the_generated_default_column():
    assert reference.default_doc(Key(Int(), "35")) == "`35`"
    assert reference.default_doc(Key(Path(), "")) == "not set"
    assert reference.default_doc(Key(Int())) == "required"
    assert reference.default_doc(Key(Int(), lambda values, built: 1, default_doc="one")) == "one"
    with pytest.raises(ValueError, match="a computed default needs a default_doc"):
        reference.default_doc(Key(Int(), lambda values, built: 1))


def test_keys_alike_share_one_row(monkeypatch):
    """The listener's [limits] overrides: one row for all, and each example kept."""
    alike = dict(type="as in `[x]`", default_doc="the `[x]` value", doc="Override it.")
    keys = {
        "a": Key(Int(1), "3", doc="A first.", example="4"),
        "b": Key(Int(1), lambda values, built: 1, example="2", **alike),
        "c": Key(Int(1), lambda values, built: 1, **alike),
        "d": Key(Int(1), lambda values, built: 1, example="5", **alike),
    }
    section = Section("x", keys, None, None)
    monkeypatch.setitem(SECTIONS, "x", section)
    assert reference.table("x") == (
        reference.HEADER + "\n"
        "| `a` | integer ≥ 1 | `3` | A first.  Example: `a = 4` |\n"
        "| `b`, `c`, `d` | as in `[x]` | the `[x]` value | Override it.  "
        "Example: `b = 2`, `d = 5` |\n"
    )
    monkeypatch.setitem(SECTIONS, "x", attr.evolve(section, keys={}, any_key=keys["a"]))
    assert reference.table("x").endswith("\n| any key | integer ≥ 1 | `3` | A first. |\n")


def test_a_table_cell_holds_no_newline_and_escapes_a_pipe(monkeypatch):
    section = Section("x", {"a": Key(Int(), "1", doc="a\nb.")}, None, None)
    monkeypatch.setitem(SECTIONS, "x", section)
    with pytest.raises(ValueError, match=r"^\[x\]: a table cell may not hold a newline"):
        reference.table("x")
    section = Section("x", {"a": Key(Int(), "1", doc="`(|(a=1)(b=2))`.")}, None, None)
    monkeypatch.setitem(SECTIONS, "x", section)
    assert reference.table("x").endswith("| `a` | integer | `1` | `(\\|(a=1)(b=2))`. |\n")


def test_main_prints_and_rewrites(tmp_path, capsys):
    assert reference.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.count("<!-- keys:") == len(SECTIONS) and reference.table("gateway") in printed
    doc = tmp_path / "README.md"
    text = "# x\n\n%s\n\ntext\n" % "\n\n".join(
        "<!-- keys:%s -->\nstale\n<!-- /keys -->" % kind for kind in SECTIONS)
    doc.write_text(text, encoding="utf-8")
    assert reference.main([str(doc)]) == 0
    assert capsys.readouterr().out == "%s: tables written\n" % doc
    assert doc.read_text(encoding="utf-8") == "# x\n\n%s\n\ntext\n" % printed.rstrip("\n")
    assert reference.main([str(doc)]) == 0
    assert capsys.readouterr().out == "%s: tables up to date\n" % doc
    doc.write_text("<!-- keys:gateway -->\n<!-- /keys -->\n", encoding="utf-8")
    assert reference.main([str(doc)]) == 1
    assert "no <!-- keys:KIND --> block for limits, queue" in capsys.readouterr().err


# --- etc/mailgate.ini ------------------------------------------------------------------------

HEADER = re.compile(r"#?\[([^\]]+)\]$")  # a commented-out header counts: [filter:NAME]'s
KEY_LINE = re.compile(r"(#?)([a-z_]+) =(.*)$")  # "key = value" or "#key = value", nothing between
COMMENTED_CONTINUATION = re.compile(r"#\s{2,}(\S.*)$")  # "#    more, of the value"


def example_lines():
    """[(section name or None, commented, key, value)] of every key line of etc/mailgate.ini."""
    with open(EXAMPLE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found, section, in_commented_value = [], None, False
    for line in lines:
        header = HEADER.match(line)
        key_line = KEY_LINE.match(line)
        continuation = COMMENTED_CONTINUATION.match(line)
        if header:
            section = header.group(1)
        elif key_line:
            commented, key, value = key_line.groups()
            found.append([section, bool(commented), key, value.strip()])
        elif continuation and in_commented_value:
            found[-1][3] += "\n" + continuation.group(1)
        if key_line:
            in_commented_value = bool(key_line.group(1))
        else:
            in_commented_value = bool(continuation) and in_commented_value
    return [tuple(one) for one in found]


def test_example_mentions_every_key_in_its_own_section():
    """
    Each key has a "key =" or "#key =" line between its section's header and the next one
    ([listener:NAME] and [route:NAME]: in at least one of them), and no key line is in a section
    it does not belong to.
    """
    mentioned = {kind: set() for kind in SECTIONS}
    headers = set()
    with open(EXAMPLE, encoding="utf-8") as f:
        for line in f.read().splitlines():
            if HEADER.match(line):
                headers.add(HEADER.match(line).group(1).partition(":")[0])
    for section, _, key, _ in example_lines():
        assert section is not None, "%s is not inside a [section]" % key
        kind = section.partition(":")[0]
        assert kind in SECTIONS, "[%s]: unknown section" % section
        if not SECTIONS[kind].any_keys:
            assert key in SECTIONS[kind].keys, "[%s] %s: not a key of this section" % (section, key)
        mentioned[kind].add(key)
    for kind, section in SECTIONS.items():
        assert kind in headers, "no [%s] section" % kind
        missing = sorted(set(section.keys) - mentioned[kind])
        assert missing == [], "[%s] does not mention %s" % (kind, ", ".join(missing))


# tests/e2e/test_startup_errors.py (example_copy) uncomments this very line, with the address of
# its test DNS server, so that the example never asks the system's resolver.
EXAMPLE_VALUES = {("dns", "nameservers", "127.0.0.1, [::1]:5353"), ("queue", "node_id", "mx1")}


def test_example_comments_out_only_defaults():
    """
    A key line commented out ("#key = value") shows the key at its default, as the file's head
    says.  Keys whose default the schema computes from other keys are skipped, since the value
    shown depends on the section it is in: [gateway] hostname (the machine's name), a listener's
    tls, auth, filters (by role; test_example_shows_the_filters_default_of_each_listener checks
    those), max_message_size and [limits] overrides, a route's dkim_sign (by mx).  [admin]
    socket, empty in the schema, is computed when the gateway starts (admin.sock in the [queue]
    path): its line is checked against mailgate.ops.admin.socket_path.  EXAMPLE_VALUES are the
    lines that show an example instead, each said so in its comment.
    """
    from mailgate.ops.admin import socket_path

    base = os.path.dirname(EXAMPLE)
    config = load_config(EXAMPLE)
    checked = 0
    for section, commented, key, value in example_lines():
        kind = section.partition(":")[0]
        spec = SECTIONS[kind].keys.get(key)
        if not commented or spec is None or spec.default is REQUIRED or callable(spec.default):
            continue
        if (section, key, value) in EXAMPLE_VALUES:
            continue
        shown = spec.kind.parse(value, base)
        if (kind, key) == ("admin", "socket"):
            assert shown == socket_path(config), "[admin] socket: not the default"
        else:
            default = spec.kind.parse(spec.default, base)
            assert shown == default, "[%s] #%s = %s: the default is %s" % (
                section, key, value, spec.kind.render(default) or "empty")
        checked += 1
    assert checked > 50
