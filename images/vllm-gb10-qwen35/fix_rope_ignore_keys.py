"""Let transformers' RoPE validation take its ignore-keys as any collection.

The validation subtracts `ignore_keys` from a set of received keys; AutoRound
checkpoints (Qwen 3.5 122B-A10B) hand it a list, and loading fails with "unsupported
operand type(s) for -=: 'set' and 'list'". Every `x -= ignore_keys` in the installed
modeling_rope_utils.py becomes `x -= set(ignore_keys)`.

Usage: python3 fix_rope_ignore_keys.py   (patches the installed transformers package)
Reports and changes nothing when the code already converts, or has no such line.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SUBTRACT = re.compile(r"(\w+\s*-=\s*)ignore_keys\b")


def main() -> int:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        print("transformers is not installed", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))) / "modeling_rope_utils.py"
    text = path.read_text()
    new, count = SUBTRACT.subn(r"\1set(ignore_keys)", text)
    if count:
        path.write_text(new)
    print(f"{path}: {count} ignore_keys subtraction(s) now accept a list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
