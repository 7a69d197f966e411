"""Make vLLM's fastsafetensors loader read checkpoint shards in numeric order.

The loader batches the shard files in the order it is given them; a plain text sort
puts `model-00010-of-00015` before `model-00002-of-00015`, and batches then mix shards
from both ends of the checkpoint. This inserts a numeric sort at the top of
`fastsafetensors_weights_iterator`.

Usage: python3 sort_fastsafetensors_shards.py vllm/model_executor/model_loader/weight_utils.py
Fails (exit 1) if the function is not there: update this file for the pinned vLLM.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FUNCTION = "fastsafetensors_weights_iterator"
HELPER = '''

def _sparkstack_shard_order(files):
    """Shard files by the numbers in their names (00002 before 00010), then by name."""
    import os.path
    import re

    def key(path):
        return [int(n) for n in re.findall(r"\\d+", os.path.basename(path))], path

    return sorted(files, key=key)
'''


def main(path: str) -> int:
    source = Path(path)
    text = source.read_text()
    if "_sparkstack_shard_order" in text:
        print(f"{path}: already sorts shards")
        return 0
    func = next((n for n in ast.walk(ast.parse(text))
                 if isinstance(n, ast.FunctionDef) and n.name == FUNCTION), None)
    if func is None:
        print(f"{path}: no {FUNCTION}(); update sort_fastsafetensors_shards.py",
              file=sys.stderr)
        return 1
    first_arg = func.args.args[0].arg
    body = func.body
    has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
    lines = text.splitlines(keepends=True)
    anchor = body[1] if has_docstring and len(body) > 1 else body[0]
    indent = lines[anchor.lineno - 1][: anchor.col_offset]
    at = body[0].end_lineno if has_docstring else body[0].lineno - 1
    lines.insert(at, f"{indent}{first_arg} = _sparkstack_shard_order({first_arg})\n")
    source.write_text("".join(lines) + HELPER)
    print(f"{path}: {FUNCTION}() now reads shards in numeric order")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
