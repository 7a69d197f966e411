"""Let vLLM's cache kernels compile with CUDA 13.

CUDA 13 dropped the failure-index argument of `cudaMemcpyBatchAsync` (12.8/12.9 took
nine arguments: dsts, srcs, sizes, count, attrs, attr_idxs, num_attrs, fail_idx,
stream; 13.x takes eight). Every nine-argument call in csrc/cache_kernels.cu loses its
eighth argument; eight-argument calls are left alone.

Usage: python3 patch_cache_kernels.py <vllm source dir>
Fails (exit 1) if the file has no call at all: update this file for the pinned vLLM.
"""

from __future__ import annotations

import sys
from pathlib import Path

CALL = "cudaMemcpyBatchAsync("


def split_args(text: str, start: int) -> tuple[list[str], int]:
    """The top-level arguments of the call whose '(' is at text[start - 1], and the index
    of its closing ')'."""
    depth, args, current, i = 1, [], [], start
    while depth:
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth == 1 and ch == ",":
            args.append("".join(current))
            current = []
        elif depth:
            current.append(ch)
        i += 1
    args.append("".join(current))
    return args, i - 1


def patch(text: str) -> tuple[str, int, int]:
    """(new text, calls seen, calls changed)."""
    out, pos, seen, changed = [], 0, 0, 0
    while (at := text.find(CALL, pos)) != -1:
        seen += 1
        open_end = at + len(CALL)
        args, close = split_args(text, open_end)
        out.append(text[pos:open_end])
        if len(args) == 9:
            del args[7]
            changed += 1
        out.append(",".join(args))
        pos = close
    out.append(text[pos:])
    return "".join(out), seen, changed


def main(src: str) -> int:
    path = Path(src) / "csrc" / "cache_kernels.cu"
    text, seen, changed = patch(path.read_text())
    if not seen:
        print(f"{path}: no {CALL}...) call; update patch_cache_kernels.py", file=sys.stderr)
        return 1
    path.write_text(text)
    print(f"{path}: {changed} of {seen} cudaMemcpyBatchAsync call(s) changed for CUDA 13")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
