"""
The schema's documentation: a key added to the schema must be documented in both places, the
README's configuration reference (generated from the Keys by mailgate.config.reference) and the
commented example etc/mailgate.ini, and neither may drift from it.
"""

import os
import re

import attr
import pytest

from mailgate.config import SECTIONS, Key, Section
from mailgate.config import reference
from mailgate.config.types import Int, Path, SecretFile

from tests import REPO

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
    blocks = readme_blocks()
    missing = [kind for kind in SECTIONS if kind not in blocks]
    assert missing == [], "README.md has no <!-- keys:KIND --> table for %s: %s" % (
        missing, REGENERATE)
    assert sorted(set(blocks) - set(SECTIONS)) == [], "README.md tables of unknown sections"


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


def test_a_table_cell_holds_no_pipe(monkeypatch):
    section = Section("x", {"a": Key(Int(), "1", doc="a | b.")}, None, None)
    monkeypatch.setitem(SECTIONS, "x", section)
    with pytest.raises(ValueError, match=r"^\[x\]: a table cell may hold neither"):
        reference.table("x")


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
