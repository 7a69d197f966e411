"""Build vLLM's FP4, CUTLASS scaled-mm and grouped-MoE kernels for SM 10.x only.

Their SM 11.x/12.x variants fail to build for GB10 (compute capability 12.1). Each
`cuda_archs_loose_intersection(<VAR> "<archs>" ...)` call for those kernel families
keeps only its 10.x entries; a family left with none is simply not built, and vLLM
falls back to its other kernels at run time.

Usage: python3 narrow_sm12_kernels.py path/to/vllm/CMakeLists.txt
Fails (exit 1) when no such call is found: the pinned vLLM source has changed and this
file must be updated, rather than building kernels known to break.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

FAMILIES = ("FP4_ARCHS", "SCALED_MM_ARCHS", "CUTLASS_MOE_DATA_ARCHS")
CALL = re.compile(r'(cuda_archs_loose_intersection\(\s*(' + "|".join(FAMILIES)
                  + r')\s+")([^"]*)(")')


def narrow(archs: str) -> str:
    """"9.0a;10.0f;11.0f;12.0f" -> "9.0a;10.0f": drop every 11.x and 12.x entry."""
    kept = [a for a in archs.split(";") if a and not a.startswith(("11.", "12."))]
    return ";".join(kept)


def main(path: str) -> int:
    cmake = Path(path)
    text = cmake.read_text()
    changes: list[str] = []

    def sub(m: re.Match[str]) -> str:
        new = narrow(m.group(3))
        if new != m.group(3):
            changes.append(f"{m.group(2)}: {m.group(3)!r} -> {new!r}")
        return m.group(1) + new + m.group(4)

    text = CALL.sub(sub, text)
    if not changes:
        print(f"{path}: no SM 11/12 entries for {', '.join(FAMILIES)}; "
              "update narrow_sm12_kernels.py for this vLLM version", file=sys.stderr)
        return 1
    cmake.write_text(text)
    print("\n".join(f"narrowed {c}" for c in changes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "CMakeLists.txt"))
