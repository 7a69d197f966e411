"""The configuration reference, generated from the config schema (config.py).

`keys()` walks the pydantic models from the top-level settings down (models, api_keys,
shaping, ...) and yields every key with its type and default. `render()` turns them into
the Markdown table that docs/configuration.md carries between its GENERATED markers;
`python -m sparkstack.config_reference --write docs/configuration.md` refreshes it and
`--check` fails when it is stale. The tests also require every key to be explained in
the prose tables, so a new key cannot ship undocumented.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Settings

BEGIN = ("<!-- BEGIN GENERATED from the config schema: "
         "python -m sparkstack.config_reference --write docs/configuration.md -->")
END = "<!-- END GENERATED -->"


@dataclass(frozen=True)
class Key:
    path: str  # e.g. models.<id>.shaping.tools
    type: str
    default: str

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1].removesuffix("[]")

    @property
    def parent(self) -> str:
        return self.path.rsplit(".", 1)[0] if "." in self.path else ""


def _nested(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The settings model inside an annotation, and how it nests (`.`, `[]`, `.<id>`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _nested(args[0])
    if origin in (list, tuple):
        found = _nested(args[0]) if args else None
        return (found[0], "[]") if found else None
    if origin is dict:
        found = _nested(args[1]) if len(args) == 2 else None
        return (found[0], ".<id>") if found else None
    if origin in (typing.Union, types.UnionType):
        for a in args:
            found = _nested(a)
            if found:
                return found[0], found[1]
    return None


def _is_duration(metadata: Any) -> bool:
    return any(getattr(getattr(m, "func", None), "__name__", "") == "parse_duration"
               for m in metadata)


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return "duration" if _is_duration(args[1:]) else _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def _default(field: Any, duration: bool) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "—"
    if duration and isinstance(value, int | float):
        return f"`{_duration(value)}`"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, BaseModel):
        return "`{}`" if not value.model_dump(exclude_defaults=True) else "see below"
    if isinstance(value, list | tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[Key]:
    for name, field in model.model_fields.items():
        path = prefix + name
        kind = "duration" if _is_duration(field.metadata) else _type(field.annotation)
        yield Key(path, kind, _default(field, kind.startswith("duration")))
        nested = _nested(field.annotation)
        if nested is not None:
            sub, how = nested
            yield from keys(sub, f"{path}{how}.")


def render() -> str:
    rows = ["| key | type | default |", "|---|---|---|"]
    rows += [f"| `{k.path}` | {k.type} | {k.default} |" for k in keys()]
    return "\n".join([BEGIN, "", *rows, "", END])


def update(text: str) -> str:
    """`text` (a Markdown document) with its generated block replaced by a fresh one."""
    if BEGIN not in text or END not in text:
        raise ValueError("the document has no GENERATED markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, help="refresh the table in this Markdown file")
    p.add_argument("--check", type=Path, help="exit 1 if this file's table is stale")
    args = p.parse_args(argv)
    if args.write:
        args.write.write_text(update(args.write.read_text()))
    elif args.check:
        if update(args.check.read_text()) != args.check.read_text():
            print(f"{args.check}: the generated reference is stale; run "
                  f"python -m sparkstack.config_reference --write {args.check}", file=sys.stderr)
            return 1
    else:
        print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
