"""`owngpt models`: the from-scratch presets and the checkpoints already on disk."""

from __future__ import annotations

import argparse

HELP = "list from-scratch presets and checkpoints on disk"
DESCRIPTION = """List what `--model` can name without a network:
  - the from-scratch presets (random initial weights), with their parameter count for GPT-2's 50,257-token vocabulary
    (a char or small BPE vocabulary makes the embeddings, and so the model, smaller);
  - pretrained models in the Hugging Face cache (pass their id);
  - checkpoints under ./runs, ./models and each --dir (pass their path).

examples:
  owngpt models
  owngpt models --dir models --dir /data/checkpoints"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also list checkpoints found under DIR (repeatable); ./runs is always searched",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def _fmt_size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:,.1f} {unit}"
    return f"{n} B"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from owngpt.hub import cached_models
    from owngpt.models import list_checkpoints, preset_table

    presets = preset_table()
    cached = cached_models()
    roots = [Path("runs"), Path("models"), *(Path(d) for d in args.dir)]  # models/: `owngpt download --out models/X`
    local = list_checkpoints(roots)
    if args.json:
        print(
            json.dumps(
                {
                    "presets": presets,
                    "hub_cache": [
                        {"id": m.repo_id, "path": str(m.path), "bytes": m.size_bytes, "complete": m.complete}
                        for m in cached
                    ],
                    "local": local,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    print("From-scratch presets (random initial weights; parameters with GPT-2's 50,257-token vocabulary):")
    print(f"  {'--model':<22}{'arch':>6}{'layers':>7}{'heads':>7}{'dims':>7}{'context':>9}{'params':>10}")
    for p in presets:
        print(
            f"  {p['model']:<22}{p['arch']:>6}{p['n_layer']:>7}{p['n_head']:>7}{p['n_embd']:>7}{p['n_positions']:>9}"
            f"{_fmt_params(p['parameters']):>10}"
        )
    print("  (bare gpt2, gpt2-medium, ... mean OpenAI's pretrained weights from the Hub, never these presets)")
    print()
    print("Pretrained models in the Hugging Face cache (--model ID, works offline):")
    if not cached:
        print("  none (fetch one with `owngpt download MODEL_ID`)")
    for m in cached:
        note = "" if m.complete else "  (incomplete: no safetensors weights; download again)"
        print(f"  {m.repo_id:<40}{_fmt_size(m.size_bytes):>10}  {m.path}{note}")
    print()
    shown = [str(r) for r in roots if r.is_dir()] or ["runs"]
    print(f"Checkpoints on disk under {', '.join(shown)} (--model PATH):")
    if not local:
        print("  none")
    for c in local:
        what = ", ".join(str(x) for x in (c.get("task"), c.get("model_type"), c.get("step_text")) if x)
        print(f"  {c['path']:<50}{_fmt_size(c['bytes']):>10}  {what}")
    return 0
