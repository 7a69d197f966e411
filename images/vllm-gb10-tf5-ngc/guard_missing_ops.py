"""Make vLLM's CUTLASS capability checks answer "no" when a kernel was not built.

This image builds kernels for GB10 only, and some CUTLASS families are skipped for it.
vLLM asks `cutlass_scaled_mm_supports_fp8(capability)` and friends before choosing a
kernel; when the op behind the question is missing, the question itself raises and the
model fails to load. The wrappers appended to the installed vllm/_custom_ops.py return
False instead, so vLLM picks its other kernels.

Usage: python3 guard_missing_ops.py   (patches the installed vllm package)
Fails (exit 1) if none of the checks exists: update this file for the pinned vLLM.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

CHECKS = ("cutlass_scaled_mm_supports_fp8", "cutlass_scaled_mm_supports_block_fp8",
          "cutlass_scaled_mm_supports_fp4", "cutlass_group_gemm_supported")
MARK = "# sparkstack: capability checks answer False for ops not built"


def guard_block(names: list[str]) -> str:
    lines = ["", "", MARK, "def _sparkstack_guard(check):",
             "    def guarded(*args, **kwargs):",
             "        try:",
             "            return check(*args, **kwargs)",
             "        except (AttributeError, RuntimeError, NotImplementedError):",
             "            return False",
             "    guarded.__name__ = check.__name__",
             "    guarded.__doc__ = check.__doc__",
             "    return guarded", ""]
    lines += [f"{n} = _sparkstack_guard({n})" for n in names]
    return "\n".join(lines) + "\n"


def main() -> int:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        print("vllm is not installed", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))) / "_custom_ops.py"
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already guarded")
        return 0
    names = [n for n in CHECKS if re.search(rf"^def {n}\(", text, re.M)]
    if not names:
        print(f"{path}: none of {', '.join(CHECKS)} found; update guard_missing_ops.py",
              file=sys.stderr)
        return 1
    path.write_text(text + guard_block(names))
    print(f"{path}: guarded {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
