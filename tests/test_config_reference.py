"""docs/configuration.md documents every key of the config schema, and its generated
reference table is current."""

from __future__ import annotations

import re
from pathlib import Path

from sparkstack.config_reference import BEGIN, END, keys, update

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# Where the prose table of each level's keys is; keys of other nested settings (an
# api_keys entry, requires) are named in backticks inside their parent's row.
SECTIONS = {
    "": ("## Settings", ""),
    "models.<id>": ("## Models", ""),
    "models.<id>.shaping": ("### Request shaping", ""),
    "models.<id>.shaping.reasoning": ("### Request shaping", "reasoning."),
}


def prose() -> str:
    text = DOC.read_text()
    return text.split(BEGIN)[0] + text.split(END)[1]


def section(text: str, heading: str) -> str:
    """From `heading` to the next heading of its level or above."""
    level = len(heading.split()[0])
    body = text.index("\n", text.index(heading))
    end = re.search(rf"^#{{1,{level}}} ", text[body:], re.M)
    return text[body:body + end.start()] if end else text[body:]


def rows(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", text, re.M)}


def test_every_config_key_is_explained():
    text = prose()
    missing = []
    for key in keys():
        if key.path in SECTIONS or f"{key.path}.<id>" in SECTIONS:
            continue  # `models`: the whole section explains it
        if key.parent in SECTIONS:
            heading, prefix = SECTIONS[key.parent]
            if prefix + key.name not in rows(section(text, heading)):
                missing.append(f"{key.path} (a row in '{heading}')")
        else:
            parent = key.parent.rsplit(".", 1)[-1].removesuffix("[]")
            grand = key.parent.rsplit(".", 1)[0] if "." in key.parent else ""
            heading = SECTIONS.get(grand, ("## Settings", ""))[0]
            row = rows(section(text, heading)).get(parent, "")
            if not re.search(rf"`[^`]*\b{re.escape(key.name)}\b[^`]*`", row):
                missing.append(f"{key.path} (named in the row of `{parent}`)")
    assert not missing, "undocumented in docs/configuration.md: " + ", ".join(missing)


def test_the_reference_table_is_generated_from_the_current_schema():
    text = DOC.read_text()
    assert update(text) == text, ("docs/configuration.md's reference is stale: run "
                                  "python -m sparkstack.config_reference --write "
                                  "docs/configuration.md")
    table = text.split(BEGIN)[1].split(END)[0]
    assert "| `models.<id>.shaping.tools` | `none` \\| `auto` \\| `required` | — |" in table
    assert "| `idle_ttl` | duration | `20m` |" in table
