"""The one writer of docs/benchmarks.md sections, shared by every benchmark script.

Each script owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; other sections stay untouched.
The file is written aside and renamed, so an interrupted benchmark never leaves a half-written doc.
"""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# every benchmark imports this module: its timed train() runs (and `owngpt train` subprocesses, which inherit the
# environment) write no report card, whose sampling would count as training time
os.environ.setdefault("OWNGPT_NO_REPORT", "1")


def write_section(name: str, body: str, doc: Path = DOC, title: str = "# Benchmarks\n") -> None:
    """Replace (or append) section `name` of `doc` with `body`."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else title
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)


def cpu_model() -> str:
    """The CPU's name and its widest vector instructions, e.g. "AMD EPYC (avx2)": the machines that run these
    benchmarks differ from one day to the next (AVX-512 or not), which moves CPU decode numbers more than any change."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:  # not Linux: the platform's name is what there is
        return name
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags] or [
        f for f in ("avx2",) if f in flags
    ]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"
