"""The data directory: the one interface between `owngpt prepare` and everything that reads prepared data.

Format (version 1), documented for users in docs/data.md:

    DATA_DIR/
      meta.json          format, version, task, tokenizer summary, token dtype, per-split counts, input checksums
                         files: {relative path: {bytes, sha256}} of every file below (checked on open)
      report.json        the cleaning report (what came in, what each rule dropped, examples)
      tokenizer/         a Hugging Face tokenizer dir: AutoTokenizer.from_pretrained(DATA_DIR/"tokenizer") loads it
      # task "lm"
      train.bin val.bin  flat token ids (meta["dtype"], little-endian), each document followed by the EOS id
      # task "chat"
      {split}.jsonl      one {"messages": [{"role", "content"}, ...]} per line (cleaned; the source of truth)
      {split}.ids.bin    the rendered conversations' token ids, concatenated (meta["dtype"])
      {split}.mask.bin   uint8, 1 where the token is trained on (assistant spans), aligned with ids
      {split}.idx.npy    int64 offsets, n+1 of them: example i is ids[idx[i]:idx[i+1]]
      # task "classify"
      {split}.jsonl      one {"text", "label"} per line, label as its name (string)
      {split}.ids.bin {split}.idx.npy   token ids per example, as for chat
      {split}.labels.npy int64 label ids; meta["labels"] lists the names in id order

Readers never unpickle anything: numpy arrays are loaded with allow_pickle=False, metadata is JSON.
Readers check before use (`DataDir.verify`, run by `open_data_dir`): meta.json["files"] records every file's size
and SHA-256 (prepare writes it); sizes are always compared, the hashes when the data dir is small enough that
hashing is cheap (`HASH_CHECK_MAX_BYTES`; SHA-256 runs at about 2 GB/s here); the token files must agree with the
counts in meta.json (a truncated or odd-length train.bin is refused, never read as 5% of the data); the tokenizer
must be the one the ids were made with (vocab size, and tokenizer.json's hash). Data dirs written before
meta.json had "files" still load, with the size checks that the counts allow.
Writers build the directory aside and rename it into place (`building`), so an error never leaves a half-written dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from owngpt import atomic, outdir
from owngpt.errors import DataError
from owngpt.outdir import replacing
from owngpt.tokenizer import load_tokenizer

FORMAT = "owngpt-data"
VERSION = 1
META = "meta.json"
REPORT = "report.json"
TOKENIZER_DIR = "tokenizer"
TASKS = ("lm", "chat", "classify")
SPLITS = ("train", "val")
# Hash every file on open while the whole dir is at most this big (about 0.1 s at 2 GB/s); sizes are always checked.
HASH_CHECK_MAX_BYTES = 256 << 20
REPREPARE = (
    "the data dir is damaged or was changed after `owngpt prepare`: run `owngpt prepare` again (or copy it again)"
)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file a reader uses (not meta.json or report.json)."""
    d = Path(directory)
    out = {}
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if f.is_file() and rel not in (META, REPORT) and not rel.startswith("."):
            out[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and memory traffic), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@contextlib.contextmanager
def building(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Iterator[Path]:
    """Yield a new directory beside `out_dir`; on success it replaces `out_dir` atomically, on error it is removed.

    owngpt.outdir's rules apply: an `out_dir` that is or holds one of `inputs` is refused, and an existing one is
    replaced only with `overwrite` and only when it is a data dir owngpt made.
    """
    with replacing(out_dir, kind=outdir.DATA, overwrite=overwrite, inputs=inputs, suggest="data", create=True) as tmp:
        yield tmp


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (owngpt.atomic.write_json: a temp file, then renamed)."""
    atomic.write_json(path, obj)


class RaggedWriter:
    """Streams variable-length int arrays into `{prefix}.ids.bin` (+ optional `.mask.bin`) and `{prefix}.idx.npy`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, with_mask: bool = False):
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self._ids = open(self.directory / f"{split}.ids.bin", "wb")
        self._mask = open(self.directory / f"{split}.mask.bin", "wb") if with_mask else None
        self._offsets = [0]

    def add(self, ids: list[int] | np.ndarray, mask: list[int] | np.ndarray | None = None) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._ids.write(arr.tobytes())
        if self._mask is not None:
            m = np.asarray(mask, dtype=np.uint8)
            if m.shape != arr.shape:
                raise ValueError("mask and ids differ in length")
            self._mask.write(m.tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    def close(self) -> int:
        self._ids.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self.directory / f"{self.split}.idx.npy", np.asarray(self._offsets, dtype=np.int64))
        return len(self._offsets) - 1


@dataclass
class DataDir:
    """A prepared data directory, opened for reading."""

    path: Path
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels", []))

    def split_meta(self, split: str) -> dict[str, Any]:
        return self.meta.get("splits", {}).get(split, {})

    def has_split(self, split: str) -> bool:
        return self.split_meta(split).get("documents", self.split_meta(split).get("examples", 0)) > 0

    def load_tokenizer(self):

        tok = load_tokenizer(self.tokenizer_path)
        if len(tok) != self.vocab_size:  # a swapped tokenizer/ would give ids that mean other tokens, or none
            raise DataError(
                f"{self.tokenizer_path} has {len(tok)} tokens but {self.path / META} says the ids were made with "
                f"{self.vocab_size}: the tokenizer was replaced; {REPREPARE}"
            )
        return tok

    # --- checks before use ------------------------------------------------------------------------------------
    def verify(self, hashes: bool | None = None) -> None:
        """Refuse a damaged data dir: sizes (always), hashes (`hashes`; None = when the dir is small), counts."""
        recorded = self.meta.get("files")
        if recorded is not None:
            if not isinstance(recorded, dict):
                raise DataError(f"{self.path / META}: 'files' must be an object; {REPREPARE}")
            total = 0
            for rel, rec in recorded.items():
                f = self.path / rel
                if not f.is_file():
                    raise DataError(f"{f} is missing; {REPREPARE}")
                size = f.stat().st_size
                if size != rec.get("bytes"):
                    raise DataError(f"{f} has {size} bytes where meta.json records {rec.get('bytes')}; {REPREPARE}")
                total += size
            if hashes or (hashes is None and total <= HASH_CHECK_MAX_BYTES):
                for rel, rec in recorded.items():
                    if file_sha256(self.path / rel) != rec.get("sha256"):
                        raise DataError(
                            f"{self.path / rel}: its SHA-256 differs from the one meta.json records; {REPREPARE}"
                        )
        for split in SPLITS:
            if self.task == "lm":
                self._verify_lm(split)
            else:
                self._verify_ragged(split)

    def _count(self, split: str, key: str) -> int | None:
        v = self.split_meta(split).get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    def _verify_size(self, f: Path, itemsize: int, expected: int | None) -> int:
        """The number of items in `f`; refuses a size that is not a whole number of items or not `expected`."""
        size = f.stat().st_size if f.exists() else 0
        if size % itemsize:
            raise DataError(
                f"{f} has {size} bytes, not a whole number of {itemsize}-byte token ids (cut short?); {REPREPARE}"
            )
        if expected is not None and size // itemsize != expected:
            raise DataError(
                f"{f} holds {size // itemsize} items where meta.json records {expected} (cut short?); {REPREPARE}"
            )
        return size // itemsize

    def _verify_lm(self, split: str) -> None:
        f = self.path / f"{split}.bin"
        if not f.exists():  # a missing file is refused by meta["files"] (above) or when a reader needs it
            return
        n = self._verify_size(f, self.dtype.itemsize, self._count(split, "tokens"))
        if n:
            self._verify_ids(f)

    def _verify_ids(self, f: Path) -> None:
        """Every id below the vocab size (an id past it would index past the embedding); when the file is small."""
        if f.stat().st_size > HASH_CHECK_MAX_BYTES:
            return
        top = int(np.max(np.memmap(f, dtype=self.dtype, mode="r")))
        if top >= self.vocab_size:
            raise DataError(
                f"{f} holds token id {top}, but the tokenizer has {self.vocab_size} tokens: the ids were made with "
                f"another tokenizer; {REPREPARE}"
            )

    def _verify_ragged(self, split: str) -> None:
        ids_f, idx_f = self.path / f"{split}.ids.bin", self.path / f"{split}.idx.npy"
        if not idx_f.exists():  # chat evaluation reads {split}.jsonl alone; the readers refuse what they miss
            return
        n_ids = self._verify_size(ids_f, self.dtype.itemsize, self._count(split, "tokens"))
        try:
            offsets = np.load(idx_f, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{idx_f} is not a readable .npy file ({e}); {REPREPARE}") from None
        examples = self._count(split, "examples")
        if (
            offsets.ndim != 1
            or len(offsets) < 1
            or offsets.dtype.kind not in "iu"
            or int(offsets[0]) != 0
            or int(offsets[-1]) != n_ids
            or (examples is not None and len(offsets) != examples + 1)
        ):
            raise DataError(f"{idx_f} does not index {ids_f.name} as meta.json describes; {REPREPARE}")
        if n_ids:
            self._verify_ids(ids_f)
        mask_f = self.path / f"{split}.mask.bin"
        if mask_f.exists():
            self._verify_size(mask_f, 1, n_ids)
        labels_f = self.path / f"{split}.labels.npy"
        if self.task == "classify" and labels_f.exists():
            try:
                labels = np.load(labels_f, allow_pickle=False, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{labels_f} is not a readable .npy file ({e}); {REPREPARE}") from None
            if labels.shape != (len(offsets) - 1,):
                raise DataError(f"{labels_f} has {labels.shape} labels for {len(offsets) - 1} examples; {REPREPARE}")

    # --- lm -------------------------------------------------------------------------------------------
    def tokens(self, split: str) -> np.memmap:
        """The flat token stream of a language-modelling split, memory-mapped (not read into memory)."""
        self._expect("lm")
        f = self.path / f"{split}.bin"
        if not f.exists():
            raise DataError(f"{f} is missing: the data dir is incomplete; run `owngpt prepare` again")
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=self.dtype)  # np.memmap refuses empty files
        return np.memmap(f, dtype=self.dtype, mode="r")

    # --- chat / classify ------------------------------------------------------------------------------------
    def ragged(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, offsets, mask or None) of a chat or classify split; example i is ids[offsets[i]:offsets[i+1]]."""
        self._expect("chat", "classify")
        ids_f, idx_f, mask_f = (self.path / f"{split}.{s}" for s in ("ids.bin", "idx.npy", "mask.bin"))
        if not idx_f.exists():
            raise DataError(f"{idx_f} is missing: the data dir is incomplete; run `owngpt prepare` again")
        offsets = np.load(idx_f, allow_pickle=False)
        ids = np.fromfile(ids_f, dtype=self.dtype) if ids_f.exists() else np.zeros(0, self.dtype)
        mask = np.fromfile(mask_f, dtype=np.uint8) if mask_f.exists() else None
        return ids, offsets, mask

    def records(self, split: str) -> Iterator[dict[str, Any]]:
        """The cleaned records (`{"messages"}` for chat, `{"text", "label"}` for classify) of a split."""
        f = self.path / f"{split}.jsonl"
        if not f.exists():
            return iter(())
        return (json.loads(line) for line in open(f, encoding="utf-8") if line.strip())

    def label_ids(self, split: str) -> np.ndarray:
        self._expect("classify")
        return np.load(self.path / f"{split}.labels.npy", allow_pickle=False)

    def _expect(self, *tasks: str) -> None:
        if self.task not in tasks:
            raise DataError(
                f"{self.path} holds '{self.task}' data, but this needs {' or '.join(tasks)} data: "
                f"prepare it with `owngpt prepare ... --task {tasks[0]}`"
            )


def open_data_dir(path: str | os.PathLike, verify: bool = True) -> DataDir:
    """Open a prepared data dir, with a clear error when it is not one or is damaged (see `DataDir.verify`)."""
    p = Path(path)
    meta_f = p / META
    if not p.is_dir():
        raise DataError(f"{p} is not a directory: pass the --out of `owngpt prepare`")
    if not meta_f.exists():
        raise DataError(f"{p} has no {META}: it is not a data dir made by `owngpt prepare`")
    try:
        meta = json.loads(meta_f.read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{meta_f} is nested too deeply to be owngpt's meta.json: run `owngpt prepare` again") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_f} is unreadable ({e}): run `owngpt prepare` again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_f} is not a JSON object: run `owngpt prepare` again")
    version = meta.get("version", 0)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version > VERSION:
        raise DataError(
            f"{meta_f}: format {meta.get('format')!r} v{meta.get('version')} is not one this owngpt "
            f"reads ({FORMAT} v{VERSION}); prepare the data again or upgrade owngpt"
        )
    if meta.get("task") not in TASKS:
        raise DataError(f"{meta_f}: unknown task {meta.get('task')!r}; expected one of {', '.join(TASKS)}")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int) or tok["vocab_size"] < 1:
        raise DataError(f"{meta_f}: no valid tokenizer.vocab_size; {REPREPARE}")
    try:
        dtype = np.dtype(meta.get("dtype"))
    except TypeError:
        dtype = None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"{meta_f}: dtype {meta.get('dtype')!r} is not uint16 or uint32; {REPREPARE}")
    if not isinstance(meta.get("splits", {}), dict):
        raise DataError(f"{meta_f}: 'splits' must be an object; {REPREPARE}")
    d = DataDir(p, meta)
    if verify:
        d.verify()
    return d
