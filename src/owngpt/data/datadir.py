"""The data directory: the one interface between `owngpt prepare` and everything that reads prepared data.

Format (version 1), documented for users in docs/data.md:

    DATA_DIR/
      meta.json          format, version, task, tokenizer summary, token dtype, per-split counts, input checksums
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
Writers build the directory aside and rename it into place (`building`), so an error never leaves a half-written dir.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from owngpt import outdir
from owngpt.errors import DataError
from owngpt.outdir import replacing

FORMAT = "owngpt-data"
VERSION = 1
META = "meta.json"
REPORT = "report.json"
TOKENIZER_DIR = "tokenizer"
TASKS = ("lm", "chat", "classify")
SPLITS = ("train", "val")


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
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
        from owngpt.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

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


def open_data_dir(path: str | os.PathLike) -> DataDir:
    """Open a prepared data dir, with a clear error when it is not one."""
    p = Path(path)
    meta_f = p / META
    if not p.is_dir():
        raise DataError(f"{p} is not a directory: pass the --out of `owngpt prepare`")
    if not meta_f.exists():
        raise DataError(f"{p} has no {META}: it is not a data dir made by `owngpt prepare`")
    try:
        meta = json.loads(meta_f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_f} is unreadable ({e}): run `owngpt prepare` again") from e
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise DataError(
            f"{meta_f}: format {meta.get('format')!r} v{meta.get('version')} is not one this owngpt "
            f"reads ({FORMAT} v{VERSION}); prepare the data again or upgrade owngpt"
        )
    if meta.get("task") not in TASKS:
        raise DataError(f"{meta_f}: unknown task {meta.get('task')!r}; expected one of {', '.join(TASKS)}")
    return DataDir(p, meta)
