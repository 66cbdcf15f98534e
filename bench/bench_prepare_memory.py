"""Peak memory of `owngpt prepare` against input size: one huge line, and many small documents.

    python bench/bench_prepare_memory.py [--sizes-mb 10 50 200] [--max-memory-mb 256] [--docs-mb 50]

Each case runs `owngpt prepare` as the only child of a fresh wrapper process, which reads that child's peak resident
set size from `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`. The baseline,
measured the same way in the same run, is a child that only imports what prepare imports (numpy, tokenizers,
transformers' tokenizer class) and exits: what prepare adds on top of it is what `--max-memory-mb` bounds.

Inputs are generated (seeded): English-like words separated by single spaces, with no newline at all for the
"one line" cases (the worst case for a reader that splits lines, and for a tokenizer given the whole line), and
blank-line-separated paragraphs of about 500 characters for "many small documents". Writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "prepare-memory"
IMPORTS = "import numpy, tokenizers, transformers; from transformers import PreTrainedTokenizerFast"


def _words(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    return ["".join(rng.choice(letters[: rng.randint(6, 26)]) for _ in range(rng.randint(1, 9))) for _ in range(20000)]


def write_one_line(path: Path, mb: int, seed: int = 0) -> None:
    """`mb` MB of words separated by single spaces, no newline."""
    rng, words = random.Random(seed), _words(seed)
    target = mb << 20
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < target:
            chunk = " ".join(rng.choices(words, k=20000)) + " "
            f.write(chunk)
            n += len(chunk)


def write_many_docs(path: Path, mb: int, seed: int = 1) -> int:
    """`mb` MB of ~500-character paragraphs separated by blank lines; returns the number of documents."""
    rng, words = random.Random(seed), _words(seed)
    target, n, docs = mb << 20, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while n < target:
            para = " ".join(rng.choices(words, k=90)) + "\n\n"
            f.write(para)
            n += len(para)
            docs += 1
    return docs


# Runs `cmd` as its own child and prints that child's peak RSS (kB) and exit code: ru_maxrss of RUSAGE_CHILDREN is a
# maximum over every child a process ever waited for, so each measurement gets a fresh parent.
WRAPPER = (
    "import json, resource, subprocess, sys; r = subprocess.run(json.loads(sys.argv[1]), capture_output=True);"
    "sys.stderr.buffer.write(r.stderr[-2000:]);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS of `cmd` in MB, wall seconds, exit code), `cmd` run in a fresh subprocess."""
    import json

    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(cmd)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    wall = time.perf_counter() - t0
    kb, code = r.stdout.split()
    if int(code) != 0:
        print(r.stderr, file=sys.stderr)
    return int(kb) / 1024, wall, int(code)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--docs-mb", type=int, default=50, help="size of the many-small-documents input")
    ap.add_argument("--max-memory-mb", type=int, default=256)
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-mem-"))
    rows = []
    try:
        base, _, _ = peak_rss_mb([sys.executable, "-c", IMPORTS])
        print(f"baseline (imports only): {base:.0f} MB")
        cases = [("many small documents", args.docs_mb, "docs")] + [
            ("one line", mb, "line") for mb in sorted(args.sizes_mb)
        ]
        for label, mb, kind in cases:
            src = work / f"{kind}-{mb}.txt"
            docs = write_many_docs(src, mb) if kind == "docs" else (write_one_line(src, mb) or 1)
            out = work / f"out-{kind}-{mb}"
            cmd = [sys.executable, "-m", "owngpt", "prepare", str(src), "--out", str(out), "--quiet"]
            cmd += ["--max-memory-mb", str(args.max_memory_mb)] + (["--doc-sep", "blank"] if kind == "docs" else [])
            peak, wall, code = peak_rss_mb(cmd)
            rows.append(
                {"case": f"{label}, {mb} MB", "docs": docs, "peak": peak, "over": peak - base, "wall": wall, "ok": code}
            )
            print(rows[-1])
            src.unlink()
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_doc:
        write_section(rows, base, args)
    return 0


def write_section(rows: list[dict], base: float, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _doc import write_section as write

    sizes = " ".join(str(s) for s in args.sizes_mb)
    lines = [
        "## Prepare: peak memory against input size",
        "",
        f"`owngpt prepare` with `--max-memory-mb {args.max_memory_mb}` (the default), BPE tokenizer trained on the "
        f"input (`--doc-sep blank` for the documents). Peak RSS of the prepare process (`getrusage(RUSAGE_CHILDREN)`), and what it adds over a process that "
        f"only imports prepare's libraries ({base:.0f} MB, measured in the same run). "
        f"{os.cpu_count()} cores, shared with other jobs while it ran (times are indicative only).",
        "",
        "| input | input documents | peak RSS (MB) | over the imports (MB) | wall (s) | exit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['docs']:,} | {r['peak']:.0f} | {r['over']:.0f} | {r['wall']:.0f} | {r['ok']} |"
        )
    lines += [
        "",
        "Before this change (issue #19, on main 0b380db) one 200 MB line grew to 24 GB and was killed (about 130 "
        "bytes per character): the whole line went to the tokenizer at once. Now a plain-text document longer than 1/16 of `--max-memory-mb` is cut "
        "into consecutive documents (`long_document_split` in report.json), and texts reach the tokenizer in pieces "
        "of 1/1024 of it, cut where the tokens do not change.",
        "",
        f"Reproduce: `python bench/bench_prepare_memory.py --sizes-mb {sizes} --docs-mb {args.docs_mb} "
        f"--max-memory-mb {args.max_memory_mb}`",
    ]
    write(SECTION, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
