"""Install a chat template from a Hugging Face snapshot before vLLM starts.

Some Qwen 3.5/3.6 checkpoints ship a template that vLLM renders badly; the models then
run with `--chat-template /workspace/unsloth.jinja`, and this puts a good template
there: the `chat_template.jinja` of the snapshot of $QWEN35_CHAT_TEMPLATE_MODEL_ID in
the cache under $QWEN35_CHAT_TEMPLATE_CACHE_ROOT (default /models; both the
HF_HUB_CACHE layout and the HF_HOME one with a hub/ folder are searched), else the
file $QWEN35_CHAT_TEMPLATE_SOURCE. Target: $QWEN35_CHAT_TEMPLATE_TARGET (default
/workspace/unsloth.jinja). Exits 1, saying what it looked for, if there is none.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def snapshot_templates(root: Path, model_id: str) -> list[Path]:
    """chat_template.jinja files of the model's snapshots: the one `refs/main` names
    first, then the newest."""
    found: list[Path] = []
    folder = "models--" + model_id.replace("/", "--")
    for repo in (root / folder, root / "hub" / folder):
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        main = ref.read_text().strip() if ref.is_file() else ""
        candidates = sorted(snapshots.glob("*/chat_template.jinja"),
                            key=lambda p: (p.parent.name != main, -p.stat().st_mtime))
        found += candidates
    return found


def main() -> int:
    model_id = os.environ.get("QWEN35_CHAT_TEMPLATE_MODEL_ID", "").strip()
    root = Path(os.environ.get("QWEN35_CHAT_TEMPLATE_CACHE_ROOT") or "/models")
    source = os.environ.get("QWEN35_CHAT_TEMPLATE_SOURCE", "").strip()
    target = Path(os.environ.get("QWEN35_CHAT_TEMPLATE_TARGET") or "/workspace/unsloth.jinja")
    candidates = snapshot_templates(root, model_id) if model_id else []
    if source:
        candidates.append(Path(source))
    chosen = next((p for p in candidates if p.is_file()), None)
    if chosen is None:
        looked = [f"a snapshot of {model_id} under {root}"] if model_id else []
        looked += [source] if source else []
        print("no chat template found (looked for " + (" and ".join(looked) or "nothing: "
              "set QWEN35_CHAT_TEMPLATE_MODEL_ID or QWEN35_CHAT_TEMPLATE_SOURCE")
              + "); download that model first", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chosen, target)
    print(f"chat template {chosen} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
