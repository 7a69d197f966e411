"""Give Qwen3-Next's MoE router gate the model's quantization config.

vLLM builds the router gate of Qwen3-Next (and Qwen3-Coder-Next) with
`quant_config=None`. AutoRound checkpoints quantize that gate too, so the weights do not
fit the unquantized layer and loading fails. This passes the block's `quant_config`.

Usage: python3 patch_qwen3_next_gate.py   (patches the installed vllm package)
Reports and leaves the file alone when the code is already fixed or not what this
expects (a newer vLLM may have fixed it differently); it never fails the build.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

MODULE = ("model_executor", "models", "qwen3_next.py")


def gate_calls(tree: ast.AST) -> list[tuple[ast.FunctionDef, ast.Call]]:
    """(enclosing function, call) for every `self.gate = ReplicatedLinear(...)`."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", "") == "ReplicatedLinear"
                    and any(isinstance(t, ast.Attribute) and t.attr == "gate"
                            for t in node.targets)):
                found.append((func, node.value))
    return found


def has_quant_config(func: ast.FunctionDef) -> bool:
    if any(a.arg == "quant_config" for a in func.args.args + func.args.kwonlyargs):
        return True
    return any(isinstance(n, ast.Name) and n.id == "quant_config" and isinstance(n.ctx, ast.Store)
               for n in ast.walk(func))


def main() -> int:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        print("vllm is not installed", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MODULE)
    if not path.exists():
        print(f"{path}: not found; Qwen3-Next gate left as is")
        return 0
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    patched = 0
    # Bottom-up, so earlier offsets stay valid.
    for func, call in sorted(gate_calls(ast.parse(text)), key=lambda fc: -fc[1].lineno):
        kw = next((k for k in call.keywords if k.arg == "quant_config"), None)
        if kw is None or not (isinstance(kw.value, ast.Constant) and kw.value.value is None):
            print(f"{path}:{call.lineno}: gate already takes a quant_config")
            continue
        if not has_quant_config(func):
            print(f"{path}:{call.lineno}: no quant_config in {func.name}(); left as is")
            continue
        row = kw.value.lineno - 1
        line = lines[row]
        lines[row] = (line[:kw.value.col_offset] + "quant_config"
                      + line[kw.value.end_col_offset:])
        patched += 1
    if patched:
        path.write_text("".join(lines))
    print(f"{path}: {patched} router gate(s) now take the quant_config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
