"""Size vLLM's Triton MLA decode for long contexts (GLM-4.7-Flash).

The Triton MLA backend decodes with a fixed 4 KV splits, so at long context each
split walks tens of thousands of tokens and decode crawls. This replaces the constant
with about one split per 1500 tokens of the longest sequence in the batch, kept
between 32 and 128. While a CUDA graph is being captured the count stays at 32: a
graph holds one shape.

Usage: python3 mla_kv_splits.py   (patches the installed vllm package)
Fails (exit 1) if the constant is not there: update this file for the pinned vLLM.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MODULE = ("v1", "attention", "backends", "mla", "triton_mla.py")
CONSTANT = re.compile(r"^(?P<indent>[ \t]+)num_kv_splits = 4\b.*$", re.M)
HELPER = '''

def _sparkstack_num_kv_splits(attn_metadata, tokens_per_split=1500, low=32, high=128):
    """About one KV split per `tokens_per_split` tokens of the longest sequence."""
    import torch

    seq_lens = getattr(getattr(attn_metadata, "decode", None), "seq_lens", None)
    if seq_lens is None or torch.cuda.is_current_stream_capturing():
        return low
    longest = int(seq_lens.max())
    return max(low, min(high, -(-longest // tokens_per_split)))
'''


def main() -> int:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        print("vllm is not installed", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MODULE)
    text = path.read_text() if path.exists() else ""
    if "_sparkstack_num_kv_splits" in text:
        print(f"{path}: already sized")
        return 0
    new, count = CONSTANT.subn(
        r"\g<indent>num_kv_splits = _sparkstack_num_kv_splits(attn_metadata)", text)
    if not count:
        print(f"{path}: no `num_kv_splits = 4` to replace; update mla_kv_splits.py",
              file=sys.stderr)
        return 1
    path.write_text(new + HELPER)
    print(f"{path}: {count} decode path(s) now size their KV splits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
