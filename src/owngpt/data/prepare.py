"""`owngpt prepare` as a function: raw files -> cleaned, split, tokenized data dir (format: owngpt.data.datadir).

    from owngpt.data.prepare import PrepareConfig, prepare
    result = prepare(PrepareConfig(sources=["poems.txt"], out="data/poems", doc_sep="%", tokenizer="char"))

The pipeline streams, in two passes over a spill file so memory is bounded by `max_memory_mb`, not by the corpus:
  1. read (owngpt.data.readers, or owngpt.data.personal for chat exports) -> clean and filter (owngpt.data.clean)
     -> append each kept record to a temporary JSONL spill file;
  2. choose the validation documents (seeded, by document), build the tokenizer on the train split (owngpt.tokenizer),
     then tokenize the spill file in chunks and write the split files.
Everything is built in a temporary dir renamed into place at the end (`datadir.building`): an error leaves nothing.
The same inputs and settings give byte-identical files (no timestamps, sorted vocabularies, seeded split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt import tokenizer as T
from owngpt.chat_format import render, render_text
from owngpt.checkpoint import run_relative
from owngpt.data import datadir, personal
from owngpt.data.clean import Cleaner
from owngpt.data.personal import file_alias
from owngpt.data.privacy import Redactor, region_ok
from owngpt.data.readers import FORMATS, READERS, Invalid, Record, SourceFile, check_encoding, discover, infer_task
from owngpt.data.report import Report
from owngpt.errors import ConfigError, DataError
from owngpt.tokenizer import encode_batch, plain_backend, separator_token_id
from owngpt.version import __version__

UNITS = {"lm": "documents", "chat": "conversations", "classify": "examples"}
SOURCE_FORMATS = ("whatsapp", "telegram", "wechat", "csv")
# For chat data the tokenizer must also know the words of the template (roles), not only the message contents.
TEMPLATE_WORDS = "system\nuser\nassistant\n"
# --vocab-size bounds: a byte-level BPE needs its 256 bytes + 4 special tokens; the largest vocabularies in use
# (Gemma's) have 262,144 entries, and far larger ones make the Rust trainer abort the whole process.
MIN_VOCAB, MAX_VOCAB = 260, 1 << 20


@dataclass
class PrepareConfig:
    """Every setting of `owngpt prepare` (the CLI flags map one to one onto these fields)."""

    sources: list[str] = field(default_factory=list)  # files or folders (searched recursively)
    out: str = ""  # the data dir to create
    task: str | None = None  # lm | chat | classify; None = inferred from the data
    format: str | None = None  # txt | jsonl | json | csv | tsv | chitchat; None = by file extension
    doc_sep: str = "file"  # plain text: file (a file is a document) | blank | line | any separator line, e.g. %
    encoding: str = "utf-8"
    text_field: str = "text"  # JSON
    label_field: str = "label"  # JSON
    messages_field: str = "messages"  # JSON
    text_column: str | None = None  # CSV/TSV; None = text, sentence, content, review...
    label_column: str | None = None  # CSV/TSV; None = label, class, category...
    labels: list[str] | None = None  # fixed label order for classify; other labels are invalid
    # cleaning
    nfkc: bool = False
    strip_html: bool = False
    dedup: bool = True
    near_dup: bool = False
    near_dup_threshold: float = 0.8
    min_chars: int = 1
    max_chars: int | None = None
    skip_invalid: bool = False
    max_invalid_fraction: float = 0.1
    # split
    val_fraction: float = 0.1
    seed: int = 1337
    # tokenizer: bpe | char | gpt2 | gpt2:DIR | PATH (a local Hugging Face tokenizer or model dir)
    tokenizer: str = "bpe"
    vocab_size: int | None = None  # bpe; None = owngpt.tokenizer.default_vocab_size(train characters)
    gpt2_vocab: str | None = None
    gpt2_merges: str | None = None
    # resources and output
    max_memory_mb: int = 256
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False
    # chat exports (owngpt.data.personal): --from whatsapp|telegram|wechat|csv
    source_format: str | None = None
    me: str | None = None
    session_gap: str = "2h"
    pseudonymize: bool = False
    keep_pii: bool = False
    region: str = "CN"  # phone numbers written without a country code are read as this region's (owngpt.data.privacy)
    time_column: str | None = None
    sender_column: str | None = None
    content_column: str | None = None


@dataclass
class PrepareResult:
    out: Path
    meta: dict[str, Any]
    report: dict[str, Any]
    report_text: str = ""


def validate(cfg: PrepareConfig) -> None:
    """Check the settings before any work, naming the flag and the accepted values."""
    if not cfg.sources:
        raise ConfigError("no inputs: pass files or folders, e.g. `owngpt prepare corpus.txt --out data/corpus`")
    if not cfg.out:
        raise ConfigError("--out DATA_DIR is required")
    if cfg.task is not None and cfg.task not in datadir.TASKS:
        raise ConfigError(f"--task {cfg.task}: expected one of {', '.join(datadir.TASKS)}")
    if cfg.format is not None and cfg.format not in FORMATS:
        raise ConfigError(f"--format {cfg.format}: expected one of {', '.join(FORMATS)}")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"--val-fraction {cfg.val_fraction}: expected a number in [0, 1), e.g. 0.1")
    if not 0 <= cfg.max_invalid_fraction <= 1:
        raise ConfigError(f"--max-invalid-fraction {cfg.max_invalid_fraction}: expected a number in [0, 1]")
    if not 0 < cfg.near_dup_threshold <= 1:
        raise ConfigError(f"--near-dup-threshold {cfg.near_dup_threshold}: expected a number in (0, 1], e.g. 0.8")
    if cfg.min_chars < 0 or (cfg.max_chars is not None and cfg.max_chars < max(1, cfg.min_chars)):
        raise ConfigError("--min-chars must be >= 0 and --max-chars >= --min-chars")
    if cfg.max_memory_mb < 16:
        raise ConfigError(f"--max-memory-mb {cfg.max_memory_mb}: use at least 16")
    if cfg.vocab_size is not None and cfg.tokenizer != "bpe":
        raise ConfigError("--vocab-size applies to --tokenizer bpe only")
    if cfg.vocab_size is not None and not MIN_VOCAB <= cfg.vocab_size <= MAX_VOCAB:
        raise ConfigError(  # 0 used to mean the default silently; 10^9 aborted inside the Rust trainer
            f"--vocab-size {cfg.vocab_size}: use {MIN_VOCAB} to {MAX_VOCAB:,} (256 bytes + 4 special tokens at "
            "least), or leave it out for a size fitted to the corpus"
        )
    if cfg.source_format is not None:
        if cfg.source_format not in SOURCE_FORMATS:
            raise ConfigError(f"--from {cfg.source_format}: expected one of {', '.join(SOURCE_FORMATS)}")
        if cfg.task not in (None, "chat"):
            raise ConfigError(f"--from {cfg.source_format} makes chat data: use --task chat (or leave --task out)")

        try:
            cfg.region = region_ok(cfg.region)
        except ValueError as e:
            raise ConfigError(f"--region: {e}") from e
    cfg.encoding = check_encoding(cfg.encoding)


# --- pass 1: read, clean, spill ---------------------------------------------------------------------------------


def _resolve_task(cfg: PrepareConfig, files: list[SourceFile]) -> str:
    if cfg.source_format is not None:
        return "chat"
    if cfg.task is not None:
        for f in files:
            if f.format == "txt" and cfg.task == "chat" and cfg.format is None:
                f.format = "chitchat"  # dialogue text is the only plain-text chat format
            if f.format in ("txt",) and cfg.task == "classify":
                raise ConfigError(
                    f"{f.name}: plain text has no labels; for --task classify use CSV/TSV/JSONL "
                    f"with a text and a label column"
                )
        return cfg.task
    found = {f.name: infer_task(f, cfg) for f in files}
    tasks = sorted({t for t in found.values() if t})
    if len(tasks) > 1:
        detail = "; ".join(f"{n}: {t}" for n, t in list(found.items())[:6] if t)
        raise ConfigError(
            f"the inputs hold different kinds of data ({detail}): prepare them separately, or pass --task"
        )
    return tasks[0] if tasks else "lm"


def _records(cfg: PrepareConfig, files: list[SourceFile], report: Report, task: str) -> Iterator[Record | Invalid]:
    if cfg.source_format is None:
        for f in files:
            yield from READERS[f.format](f, cfg, report, task)
        return
    for item in personal.read_exports([f.path for f in files], cfg, report):
        if isinstance(item, (Record, Invalid)):
            yield item
        else:  # a plain {"messages": [...]} dict, optionally with "file" and "line"
            yield Record(str(item.get("file", files[0].name)), int(item.get("line", 0)), messages=item["messages"])


def _record_chars(rec: Record) -> int:
    if rec.messages is not None:
        return sum(len(m["content"]) for m in rec.messages)
    return len(rec.text or "")


def _spill_line(rec: Record) -> str:
    if rec.messages is not None:
        obj: dict[str, Any] = {"m": rec.messages}
    else:
        obj = {"t": rec.text}
        if rec.label is not None:
            obj["l"] = rec.label
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _read_spill(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _count_text(rec: Record) -> str:
    """The text whose tokens a dropped record would have contributed (chat: the rendered conversation)."""
    if rec.messages is not None:
        return render_text([{"role": str(m.get("role")), "content": str(m.get("content"))} for m in rec.messages])
    return rec.text or ""


def _doc_text(doc: dict[str, Any]) -> str:
    """The text a spilled record contributes to tokenizer training and token counts."""
    if "m" in doc:
        return "\n".join(m["content"] for m in doc["m"])
    return doc["t"]


def _tqdm(cfg: PrepareConfig, **kw):
    from tqdm import tqdm

    return tqdm(disable=True if (cfg.quiet or not cfg.progress) else None, leave=False, **kw)


# --- split --------------------------------------------------------------------------------------------------------


def choose_val(n: int, val_fraction: float, seed: int):
    """A boolean mask over n documents: True = validation. Seeded; at least one of each when n > 1 and fraction > 0."""
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    if n < 2 or val_fraction <= 0:
        return mask
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    mask[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    return mask


# --- tokenizer ----------------------------------------------------------------------------------------------------


def build_tokenizer(cfg: PrepareConfig, train_texts, train_chars: int, n_train: int):
    """The tokenizer named by --tokenizer and its meta entry (kind, source...)."""

    spec = cfg.tokenizer
    if spec == "bpe":
        vocab = cfg.vocab_size or T.default_vocab_size(train_chars)
        show = cfg.progress and not cfg.quiet and sys.stderr.isatty()
        tok = T.train_bpe(train_texts(), vocab_size=vocab, length=n_train, progress=show)
        return tok, {"kind": "bpe", "source": f"byte-level BPE trained on the train split (requested vocab {vocab})"}
    if spec == "char":
        return T.char_tokenizer(train_texts()), {"kind": "char", "source": "characters of the train split + bytes"}
    if spec == "gpt2" or spec.startswith("gpt2:"):
        vocab, merges = cfg.gpt2_vocab, cfg.gpt2_merges
        if spec.startswith("gpt2:"):
            d = Path(spec[5:])
            vocab, merges = vocab or d / "vocab.json", merges or d / "merges.txt"
        tok = T.gpt2_tokenizer(vocab, merges)
        src = (
            "bundled GPT-2 vocab.json + merges.txt"
            if vocab is None
            else f"{_portable(vocab, cfg.out)} + {_portable(merges, cfg.out)}"
        )
        return tok, {"kind": "gpt2", "source": src}
    p = Path(spec)
    if not p.is_dir():
        raise ConfigError(
            f"--tokenizer {spec}: expected bpe, char, gpt2, gpt2:DIR (with vocab.json and merges.txt) "
            f"or a local Hugging Face tokenizer or model dir"
        )
    tok, pretrained = T.hf_tokenizer(p)
    return tok, {"kind": "pretrained" if pretrained else "hf", "source": _portable(p, cfg.out)}


def _portable(path: Any, data_dir: str) -> str:
    """A path as meta.json records it: relative to the data dir, else only its name (meta.json is copied into every
    checkpoint trained on the data: it must not reveal the user's folders)."""

    return run_relative(path, data_dir) or Path(path).name


# --- pass 2: tokenize and write -------------------------------------------------------------------------------------


def _safe_pieces(text: str, max_chars: int) -> list[str]:
    """Split a very long document into pieces of at most `max_chars` that tokenize as the whole does.

    Byte-level BPE (GPT-2's pre-tokenizer regex) and char tokenizers never merge across a newline between two
    non-space characters, nor across a single space between two non-space characters (a pre-token holds a space
    only as its first character); cuts go at the last such place in the window, preferring newlines. A window
    with neither (one 1M-character run without a space or newline) is cut where it ends: bounded memory matters
    more than the one token at that seam. `str.rfind` keeps the search in C: a 200 MB line splits in seconds.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _safe_cut(text, start, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _safe_cut(text: str, start: int, end: int) -> int:
    lo = start + 1
    i = end
    while True:  # after a newline followed by a non-space
        i = text.rfind("\n", lo, i)
        if i < 0:
            break
        # a whitespace run before the newline would end the piece as one pre-token ("  \n") but is two in the whole
        if i + 1 < end and not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
    i = end
    while True:  # before a single space between two non-spaces
        i = text.rfind(" ", lo, i)
        if i < 0:
            break
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    return end


class _LmWriter:
    """Buffers documents of one split and writes their ids (+ EOS each) in chunks of bounded size."""

    def __init__(self, path: Path, tok, dtype, eos: int, chunk_chars: int, split_long: bool):
        import numpy as np

        self.np, self.f, self.tok, self.dtype, self.eos = np, open(path, "wb"), tok, dtype, eos
        self.chunk_chars, self.split_long = chunk_chars, split_long
        self.buf: list[tuple[str, bool]] = []
        self.buf_chars = 0
        self.stats = {"documents": 0, "tokens": 0, "chars": 0, "bytes": 0}

    def add(self, text: str) -> None:
        self.stats["documents"] += 1
        self.stats["chars"] += len(text)
        pieces = _safe_pieces(text, self.chunk_chars) if self.split_long else [text]
        for i, p in enumerate(pieces):
            self.stats["bytes"] += len(p.encode("utf-8"))  # per piece: no second copy of a long document
            if self.buf and self.buf_chars + len(p) > self.chunk_chars:  # a batch never exceeds chunk_chars
                self.flush()
            self.buf.append((p, i == len(pieces) - 1))
            self.buf_chars += len(p)

    def flush(self) -> None:

        if not self.buf:
            return
        batch, self.buf, self.buf_chars = self.buf, [], 0
        encoded = encode_batch(self.tok, [p for p, _ in batch])
        for i, (_, last) in enumerate(batch):
            arr = self.np.asarray(encoded[i] + [self.eos] if last else encoded[i], dtype=self.dtype)
            encoded[i] = []  # free each piece's Python ints as soon as they are written
            self.f.write(arr.tobytes())
            self.stats["tokens"] += len(arr)

    def close(self) -> dict[str, int]:
        self.flush()
        self.f.close()
        return self.stats


def _write_lm(cfg, tmp, spill, val_mask, tok, enc, dtype, eos, chunk_chars, split_long, single_cut):
    writers = {s: _LmWriter(tmp / f"{s}.bin", enc, dtype, eos, chunk_chars, split_long) for s in datadir.SPLITS}
    bar = _tqdm(cfg, total=len(val_mask), desc="tokenize", unit="doc")
    for i, doc in enumerate(_read_spill(spill)):
        if single_cut is not None:  # one document: split it by position (nanoGPT's 90/10 on a single text)
            writers["train"].add(doc["t"][:single_cut])
            writers["val"].add(doc["t"][single_cut:])
        else:
            writers["val" if val_mask[i] else "train"].add(doc["t"])
        bar.update()
    bar.close()
    return {s: w.close() for s, w in writers.items()}


def _write_chat(cfg, tmp, spill, val_mask, tok, dtype):

    stats, writers, jsonl = {}, {}, {}
    for s in datadir.SPLITS:
        stats[s] = {"examples": 0, "tokens": 0, "assistant_tokens": 0, "chars": 0, "bytes": 0}
        writers[s] = datadir.RaggedWriter(tmp, s, dtype, with_mask=True)
        jsonl[s] = open(tmp / f"{s}.jsonl", "w", encoding="utf-8")
    bar = _tqdm(cfg, total=len(val_mask), desc="render", unit="conv")
    for i, doc in enumerate(_read_spill(spill)):
        s = "val" if val_mask[i] else "train"
        msgs = doc["m"]
        ids, mask = render(tok, msgs)
        writers[s].add(ids, mask)
        jsonl[s].write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        text = render_text(msgs)
        st = stats[s]
        st["examples"] += 1
        st["tokens"] += len(ids)
        st["assistant_tokens"] += sum(mask)
        st["chars"] += len(text)
        st["bytes"] += len(text.encode("utf-8"))
        bar.update()
    bar.close()
    for s in datadir.SPLITS:
        writers[s].close()
        jsonl[s].close()
    return stats


def _write_classify(cfg, tmp, spill, val_mask, enc, dtype, label_ids: dict[str, int], chunk_chars: int):
    import numpy as np

    stats, writers, jsonl, labels = {}, {}, {}, {}
    for s in datadir.SPLITS:
        stats[s] = {"examples": 0, "tokens": 0, "chars": 0, "bytes": 0}
        writers[s] = datadir.RaggedWriter(tmp, s, dtype)
        jsonl[s] = open(tmp / f"{s}.jsonl", "w", encoding="utf-8")
        labels[s] = open(tmp / f".{s}.labels.tmp", "wb")
    buf: list[tuple[str, str, str]] = []

    def flush() -> None:
        for ids, (s, text, label) in zip(encode_batch(enc, [t for _, t, _ in buf]), buf):
            writers[s].add(ids)
            jsonl[s].write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
            labels[s].write(np.int64(label_ids[label]).tobytes())
            st = stats[s]
            st["examples"] += 1
            st["tokens"] += len(ids)
            st["chars"] += len(text)
            st["bytes"] += len(text.encode("utf-8"))
        buf.clear()

    n_chars = 0
    for i, doc in enumerate(_read_spill(spill)):
        buf.append(("val" if val_mask[i] else "train", doc["t"], doc["l"]))
        n_chars += len(doc["t"])
        if n_chars >= chunk_chars:
            flush()
            n_chars = 0
    flush()
    for s in datadir.SPLITS:
        writers[s].close()
        jsonl[s].close()
        labels[s].close()
        arr = np.fromfile(tmp / f".{s}.labels.tmp", dtype=np.int64)
        np.save(tmp / f"{s}.labels.npy", arr)
        os.remove(tmp / f".{s}.labels.tmp")
    return stats


def _label_order(seen: dict[str, int], fixed: list[str] | None) -> list[str]:
    if fixed:
        return list(fixed)

    def key(x: str):
        try:
            return (0, int(x), x)
        except ValueError:
            return (1, 0, x)

    return sorted(seen, key=key)  # integers in numeric order, names alphabetically: stable across runs


def _count_tokens(enc, texts: Iterator[str], chunk_chars: int) -> int:

    total, buf, n = 0, [], 0
    for t in (p for text in texts for p in _safe_pieces(text, chunk_chars)):
        buf.append(t)
        n += len(t)
        if n >= chunk_chars:
            total += sum(len(x) for x in encode_batch(enc, buf))
            buf, n = [], 0
    if buf:
        total += sum(len(x) for x in encode_batch(enc, buf))
    return total


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# --- the whole pipeline ------------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Read, clean, split and tokenize `cfg.sources` into the data dir `cfg.out`; see the module docstring."""
    validate(cfg)
    files = discover(cfg.sources, cfg.format, any_extension=cfg.source_format is not None)
    task = _resolve_task(cfg, files)
    report = Report()
    # Tokenizing holds ~130 bytes per character (measured: ids as Python ints, offsets, the Rust encodings); BPE
    # training ~90. Texts go to the tokenizer in pieces of this many characters (with the Rust encodings, the Python
    # ints and the piece copies, a batch costs about a third of the budget; measured by bench_prepare_memory.py).
    chunk_chars = max(1 << 16, cfg.max_memory_mb * (1 << 20) // 1024)
    try:
        with datadir.building(cfg.out, overwrite=cfg.overwrite, inputs=_inputs(cfg)) as tmp:
            result = _build(cfg, files, task, report, Path(tmp), chunk_chars)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        raise DataError(f"{where}{e.strerror or e}: check the path and free disk space") from e
    result.out = Path(cfg.out).absolute()
    return result


def _inputs(cfg: PrepareConfig) -> list[tuple[str, str | None]]:
    """Every path prepare reads: --out must stay clear of them (owngpt.outdir.check_out)."""
    tok = cfg.tokenizer[len("gpt2:") :] if cfg.tokenizer.startswith("gpt2:") else cfg.tokenizer
    return [
        *(("input", s) for s in cfg.sources),
        ("tokenizer (--tokenizer)", tok if tok not in ("bpe", "char", "gpt2") else None),
        ("vocabulary (--gpt2-vocab)", cfg.gpt2_vocab),
        ("merges (--gpt2-merges)", cfg.gpt2_merges),
    ]


def _build(cfg: PrepareConfig, files: list[SourceFile], task: str, report: Report, tmp: Path, chunk_chars: int):
    import numpy as np

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the data dir should get the usual permissions
    work = tmp / ".work"
    work.mkdir()
    spill, dropped = work / "kept.jsonl", work / "dropped.txt"
    cleaner = Cleaner(cfg, report)
    fixed_labels = set(cfg.labels) if cfg.labels else None
    n_in = n_invalid = n_kept = chars_in = chars_out = 0
    labels_seen: dict[str, int] = {}
    first_invalid = None
    bar = _tqdm(cfg, desc="read+clean", unit="rec")
    with open(spill, "w", encoding="utf-8") as sp, open(dropped, "w", encoding="utf-8") as dp:
        for item in _records(cfg, files, report, task):
            bar.update()
            if isinstance(item, Record) and fixed_labels is not None and item.label not in fixed_labels:
                item = Invalid(
                    item.file, item.line, f"unknown label {item.label!r}: --labels allows {', '.join(cfg.labels or [])}"
                )
            if isinstance(item, Invalid):
                n_invalid += 1
                if not cfg.skip_invalid:
                    raise DataError(f"{item.where}: {item.reason}")
                first_invalid = first_invalid or item
                report.drop("invalid_record", item.reason, item.where)
                continue
            n_in += 1
            chars_in += _record_chars(item)
            kept = cleaner.clean(item)
            if kept is None:
                # token counts of what was dropped ("tokens in") are computed once the tokenizer exists
                dp.write(json.dumps(_count_text(item), ensure_ascii=False) + "\n")
                continue
            n_kept += 1
            chars_out += _record_chars(kept)
            if kept.label is not None:
                labels_seen[kept.label] = labels_seen.get(kept.label, 0) + 1
            sp.write(_spill_line(kept))
    bar.close()
    total = n_in + n_invalid
    if n_invalid and n_invalid > cfg.max_invalid_fraction * total:
        raise DataError(
            f"{n_invalid} of {total} records are invalid ({100 * n_invalid / total:.1f}%, above "
            f"--max-invalid-fraction {cfg.max_invalid_fraction}); the first: {first_invalid.where}: "
            f"{first_invalid.reason}"
        )
    names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if n_in == 0:
        raise DataError(
            f"{names}: no {UNITS[task]} found in the input (empty files?); check the inputs"
            + (" and --doc-sep" if task == "lm" else "")
        )
    if n_kept == 0:
        top = ", ".join(f"{k} {r.count}" for k, r in report.rules.items() if r.kind == "dropped")
        raise DataError(
            f"{names}: all {n_in} {UNITS[task]} were dropped by cleaning ({top}); "
            f"relax the filters (--min-chars, --max-chars, --near-dup) or check the inputs"
        )
    label_names: list[str] = []
    if task == "classify":
        label_names = _label_order(labels_seen, cfg.labels)
        if len(label_names) < 2:
            raise DataError(
                f"{names}: only one label ({', '.join(label_names)}) in the data: classification needs "
                f"at least two; check --label-field/--label-column"
            )

    # split: by document, seeded; a single lm document is split by position instead
    single_cut = None
    if task == "lm" and n_kept == 1 and cfg.val_fraction > 0:
        doc = next(_read_spill(spill))["t"]
        single_cut = int(len(doc) * (1 - cfg.val_fraction))
        val_mask = np.zeros(1, dtype=bool)
    else:
        val_mask = choose_val(n_kept, cfg.val_fraction, cfg.seed)

    # The BPE trainer buffers 256 texts from the iterator and holds ~90 bytes per character of each one it is
    # pre-tokenizing (measured): smaller pieces keep both parts small (a 200 MB line is ~6,000 pieces).
    train_piece = max(1 << 12, chunk_chars // 16)

    def train_texts() -> Iterator[str]:
        if task == "chat":
            yield TEMPLATE_WORDS
        for i, doc in enumerate(_read_spill(spill)):
            if single_cut is not None:
                yield from _safe_pieces(doc["t"][:single_cut], train_piece)
            elif not val_mask[i]:
                yield from _safe_pieces(_doc_text(doc), train_piece)

    if single_cut is not None:
        train_chars = single_cut
    else:
        train_chars = int(chars_out * (1 - val_mask.mean())) if val_mask.any() else chars_out
    tok, tok_info = build_tokenizer(cfg, train_texts, train_chars, int((~val_mask).sum()))
    tok.save_pretrained(tmp / datadir.TOKENIZER_DIR)
    eos = separator_token_id(tok)
    pad = tok.pad_token_id if isinstance(tok.pad_token_id, int) else eos
    dtype = datadir.token_dtype(len(tok))
    enc = plain_backend(tok)
    split_long = tok_info["kind"] in ("bpe", "char", "gpt2")

    if task == "lm":
        splits = _write_lm(cfg, tmp, spill, val_mask, tok, enc, dtype, eos, chunk_chars, split_long, single_cut)
    elif task == "chat":
        splits = _write_chat(cfg, tmp, spill, val_mask, tok, dtype)
    else:
        splits = _write_classify(
            cfg, tmp, spill, val_mask, enc, dtype, {n: i for i, n in enumerate(label_names)}, chunk_chars
        )

    unit = UNITS[task]
    n_key = "documents" if task == "lm" else "examples"
    # tokens out = what the split files hold, without the EOS after each lm document
    text_tokens_out = sum(v["tokens"] - (v["documents"] if task == "lm" else 0) for v in splits.values())
    with open(dropped, encoding="utf-8") as dropped_rows:
        dropped_tokens = _count_tokens(enc, (json.loads(line) for line in dropped_rows), chunk_chars)
    inputs = []
    for i, f in enumerate(files):
        if not f.sha256:  # read by another reader (chat exports): checksum it now
            f.sha256, f.bytes = _sha256(f.path)
        name = _portable(f.path, cfg.out)  # relative to the data dir, or the file name alone: no user's folders
        if cfg.source_format is not None and cfg.pseudonymize:  # "WhatsApp Chat with Wang Wei.txt": a contact
            name = file_alias(i, f.path)
        elif cfg.source_format is not None and not cfg.keep_pii:  # "WhatsApp Chat with +86 139....txt"
            name = Redactor(region=cfg.region).redact(name)
        inputs.append({"path": name, "format": cfg.source_format or f.format, "bytes": f.bytes, "sha256": f.sha256})
    report.totals = {
        "task": task,
        "unit": unit,
        "files": len(files),
        "in": {"documents": n_in, "invalid": n_invalid, "chars": chars_in, "tokens": text_tokens_out + dropped_tokens},
        "out": {"documents": n_kept, "chars": chars_out, "tokens": text_tokens_out},
        "splits": {s: {"documents": v[n_key], "tokens": v["tokens"], "chars": v["chars"]} for s, v in splits.items()},
    }
    if task == "classify":
        report.totals["labels"] = {n: labels_seen.get(n, 0) for n in label_names}
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("sources", "out", "overwrite", "progress", "quiet")
    }
    if cfg.source_format is not None and cfg.pseudonymize and settings.get("me"):
        settings["me"] = "(withheld: --pseudonymize)"  # the user's own name: meta.json travels with the data
    for key in ("tokenizer", "gpt2_vocab", "gpt2_merges"):  # paths: relative to the data dir
        value = settings.get(key)
        if value and value.startswith("gpt2:"):
            settings[key] = "gpt2:" + _portable(value[5:], cfg.out)
        elif value and (key != "tokenizer" or Path(value).exists()):
            settings[key] = _portable(value, cfg.out)
    if single_cut is not None:
        settings["split"] = "position"  # one document: train = first (1 - val_fraction) of it, val = the rest
    meta: dict[str, Any] = {
        "format": datadir.FORMAT,
        "version": datadir.VERSION,
        "task": task,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {**tok_info, "vocab_size": len(tok), "eos_token_id": eos, "pad_token_id": pad},
        "splits": splits,
        "inputs": inputs,
        "settings": settings,
        "owngpt_version": __version__,
    }
    if task == "classify":
        meta["labels"] = label_names
    shutil.rmtree(work)
    meta["files"] = datadir.file_records(tmp)  # sizes + SHA-256, checked by every reader (DataDir.verify)
    datadir.write_json(tmp / datadir.REPORT, report.to_dict())
    datadir.write_json(tmp / datadir.META, meta)
    return PrepareResult(Path(cfg.out), meta, report.to_dict(), report.format_table())
