"""Damaged or hostile input is refused: one row per case, each an `error:` line naming the file, exit 2, no traceback,
and every input byte-identical afterwards (docs/reliability.md lists the same cases).

The commands run in-process through `owngpt.cli.main` (what the `owngpt` script calls), so an exception that escapes
as a traceback fails the test; every loader of a checkpoint is run against every damaged checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import fixtures
from owngpt.cli import main

# --- helpers ----------------------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (and the roots' own names), to compare before and after."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_refused(capsys, argv: list[str], names: str, inputs: list[Path]) -> str:
    """Run `owngpt ARGV`; assert exit 2, one `error:` line containing `names`, no traceback, inputs untouched."""
    before = snapshot(*inputs)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and names in errors[0], err
    assert "Traceback" not in err
    assert snapshot(*inputs) == before, "an input was changed"
    return errors[0]


def edit_config(**fields) -> Callable[[Path], str]:
    def edit(ckpt: Path) -> str:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        cfg.update(fields)
        (ckpt / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        return "config.json"

    return edit


def write_file(name: str, data: bytes) -> Callable[[Path], str]:
    def edit(ckpt: Path) -> str:
        (ckpt / name).write_bytes(data)
        return name

    return edit


def truncate(name: str, keep: float) -> Callable[[Path], str]:
    def edit(d: Path) -> str:
        f = d / name
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * keep)])
        return name

    return edit


def edit_weights(change: Callable[[dict], None]) -> Callable[[Path], str]:
    def edit(ckpt: Path) -> str:
        from safetensors.torch import load_file, save_file

        tensors = load_file(ckpt / "model.safetensors")
        change(tensors)
        save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
        return "model.safetensors"

    return edit


def _extra_tensor(t: dict) -> None:
    import torch

    t["transformer.h.0.attn.extra.weight"] = torch.zeros(3)


DEEP = b"[" * 100_000 + b"]" * 100_000

# --- damaged checkpoints x every command that loads one ------------------------------------------------------------------

CHECKPOINT_CASES = {
    "n_layer above the weights (40 vs 2)": edit_config(n_layer=40),
    "n_layer below the weights (1 vs 2)": edit_config(n_layer=1),
    "n_layer -1": edit_config(n_layer=-1),
    "n_layer 10000": edit_config(n_layer=10000),
    "n_embd not the weights' width": edit_config(n_embd=64),
    "vocab_size not the weights'": edit_config(vocab_size=999),
    "a config field of the wrong type (layer_norm_epsilon 'x')": edit_config(layer_norm_epsilon="x"),
    "config.json nested 100,000 deep": write_file("config.json", DEEP),
    "config.json not JSON": write_file("config.json", b'{"n_layer": 2,'),
    "owngpt.json nested 100,000 deep": write_file("owngpt.json", DEEP),
    "owngpt.json with an unknown task": lambda ckpt: _edit_meta(ckpt, task="bogus"),
    "generation_config.json not JSON": write_file("generation_config.json", b'{"eos_token_id": '),
    "model.safetensors truncated": truncate("model.safetensors", 0.5),
    "model.safetensors random bytes": write_file("model.safetensors", bytes(range(256)) * 64),
    "model.safetensors empty": write_file("model.safetensors", b""),
    "a weight missing": edit_weights(lambda t: t.pop("transformer.ln_f.weight")),
    "an unexpected weight": edit_weights(_extra_tensor),
    "tokenizer.json truncated": truncate("tokenizer.json", 0.5),
    "tokenizer_config.json not JSON": write_file("tokenizer_config.json", b'{"model_max_length": '),
    "chat_template.jinja not valid Jinja": write_file("chat_template.jinja", b"{% for m in messages %}{{ m.content "),
    "tokenizer.json of another model (a larger vocabulary)": lambda ckpt: _other_models_tokenizer(ckpt),
}


def _edit_meta(ckpt: Path, **fields) -> str:
    meta = json.loads((ckpt / "owngpt.json").read_text(encoding="utf-8"))
    meta.update(fields)
    (ckpt / "owngpt.json").write_text(json.dumps(meta), encoding="utf-8")
    return "owngpt.json"


def _other_models_tokenizer(ckpt: Path) -> str:
    """A tokenizer.json copied from a model with a larger vocabulary: its ids reach past this model's embedding."""
    tok = fixtures.char_tokenizer(fixtures.TEXT + "".join(chr(0x4E00 + i) for i in range(400)))
    tok.backend_tokenizer.save(str(ckpt / "tokenizer.json"))
    return "tokenizer.json"


def _commands(ckpt: Path, data: Path, tmp: Path) -> dict[str, list]:
    return {
        "eval": ["eval", ckpt, "--data", data],
        "generate": ["generate", ckpt, "--prompt", "hi", "--max-new-tokens", "2"],
        "chat": ["chat", ckpt],
        "serve": ["serve", ckpt, "--port", "0"],
        "export": ["export", ckpt, "--out", tmp / "exported", "--to", "hf"],
        "prune": ["prune", ckpt, "--out", tmp / "pruned", "--sparsity", "0.5"],
        "train --model": ["train", "--model", ckpt, "--data", data, "--out", tmp / "run", "--max-steps", "1"],
    }


@pytest.mark.parametrize("command", list(_commands(Path(), Path(), Path())))
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_damaged_checkpoint_is_refused_by_every_loader(case, command, tiny_ckpt, tiny_lm_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    name = CHECKPOINT_CASES[case](ckpt)
    argv = _commands(ckpt, tiny_lm_data, tmp_path)[command]
    run_refused(capsys, argv, str(ckpt / name), [ckpt, tiny_lm_data])
    assert not any((tmp_path / n).exists() for n in ("exported", "pruned", "run")), "an output was written"


def test_a_damaged_classifier_is_refused_by_predict(tmp_path, capsys):
    ckpt = fixtures.save_tiny_checkpoint(tmp_path / "cls", task="classify")
    truncate("model.safetensors", 0.5)(ckpt)
    texts = tmp_path / "in.txt"
    texts.write_text("good\nbad\n", encoding="utf-8")
    run_refused(capsys, ["predict", ckpt, "--input", texts], str(ckpt / "model.safetensors"), [ckpt, texts])


def test_a_pickled_lora_adapter_never_reaches_torch_load(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import torch

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(tiny_ckpt), "r": 2, "target_modules": ["c_attn"]}
        ),
        encoding="utf-8",
    )
    (adapter / "adapter_model.bin").write_bytes(b"not really a pickle, and never opened")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a user file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for argv in (
        ["export", adapter, "--out", tmp_path / "e", "--to", "hf"],
        ["prune", adapter, "--out", tmp_path / "p", "--sparsity", "0.5"],
    ):
        run_refused(capsys, argv, str(adapter / "adapter_model.bin"), [adapter, tiny_ckpt])


# --- damaged data dirs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A data dir made by `owngpt prepare` (its meta.json records every file's size and SHA-256)."""
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_text((fixtures.TEXT * 20), encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared") / "data"
    assert main(["prepare", str(src), "--out", str(out), "--tokenizer", "char", "--doc-sep", "blank", "--quiet"]) == 0
    return out


def _swap_tokenizer(d: Path) -> str:
    shutil.rmtree(d / "tokenizer")
    fixtures.char_tokenizer("abc").save_pretrained(d / "tokenizer")
    return "tokenizer"


def _flip_byte(name: str) -> Callable[[Path], str]:
    def edit(d: Path) -> str:
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / name).write_bytes(bytes(data))
        return name

    return edit


def _append_byte(name: str) -> Callable[[Path], str]:
    def edit(d: Path) -> str:
        with open(d / name, "ab") as f:
            f.write(b"\x00")
        return name

    return edit


def _id_past_vocab(d: Path) -> str:
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    ids[3] = 65000
    ids.tofile(d / "train.bin")
    return "train.bin"


def _meta(change: Callable[[dict], None]) -> Callable[[Path], str]:
    def edit(d: Path) -> str:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        change(meta)
        (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        return "meta.json"

    return edit


# (which data dir: "old" = written without meta["files"] (before this check existed), "new" = by owngpt prepare)
DATA_CASES = {
    "train.bin cut to 5% (old dir)": ("old", truncate("train.bin", 0.05)),
    "train.bin cut to 5%": ("new", truncate("train.bin", 0.05)),
    "train.bin odd length (old dir)": ("old", _append_byte("train.bin")),
    "train.bin odd length": ("new", _append_byte("train.bin")),
    "val.bin one bit flipped (same size)": ("new", _flip_byte("val.bin")),
    "a token id past the vocabulary (old dir)": ("old", _id_past_vocab),
    "tokenizer swapped (old dir)": ("old", _swap_tokenizer),
    "tokenizer swapped": ("new", _swap_tokenizer),
    "meta.json nested 100,000 deep": ("new", write_file("meta.json", DEEP)),
    "meta.json with a negative vocab size": ("new", _meta(lambda m: m["tokenizer"].update(vocab_size=-5))),
}


@pytest.mark.parametrize("command", ["train", "eval", "export --data"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_a_damaged_data_dir_is_refused(case, command, tiny_lm_data, prepared, tiny_ckpt, tmp_path, capsys):
    kind, damage = DATA_CASES[case]
    data = tmp_path / "data"
    shutil.copytree(tiny_lm_data if kind == "old" else prepared, data)
    name = damage(data)
    argv = {
        "train": ["train", "--data", data, "--out", tmp_path / "run", "--max-steps", "1", "--model", "tiny"],
        "eval": ["eval", tiny_ckpt, "--data", data],
        "export --data": ["export", tiny_ckpt, "--out", tmp_path / "exported", "--to", "hf", "--data", data],
    }[command]
    run_refused(capsys, argv, str(data / name), [data, tiny_ckpt])
    assert not (tmp_path / "run").exists() and not (tmp_path / "exported").exists()


def test_an_intact_data_dir_passes_every_check(prepared, tiny_lm_data):
    from owngpt.data.datadir import open_data_dir

    d = open_data_dir(prepared)
    assert set(d.meta["files"]) >= {"train.bin", "val.bin", "tokenizer/tokenizer.json"}
    d.verify(hashes=True)
    assert len(d.load_tokenizer()) == d.vocab_size
    open_data_dir(tiny_lm_data).verify(hashes=True)  # an old dir: no "files", the count checks only


# --- prepare: hostile inputs and settings -----------------------------------------------------------------------------


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "a temporary dir was left behind"


PREPARE_CASES = {
    "--vocab-size 1000000000": (["--vocab-size", "1000000000"], "text", "--vocab-size"),
    "--vocab-size 0": (["--vocab-size", "0"], "text", "--vocab-size"),
    "a JSON line nested 100,000 deep": (["--task", "lm"], "deep.jsonl", "deep.jsonl:1"),
    "a binary file": ([], "blob.txt", "blob.txt"),
    "a JSON line longer than --max-memory-mb allows": (["--max-memory-mb", "16"], "long.jsonl", "long.jsonl:2"),
}


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_prepare_refuses_hostile_input(case, tmp_path, capsys):
    flags, kind, names = PREPARE_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = {
        "text": ("text.txt", fixtures.TEXT.encode()),
        "deep.jsonl": ("deep.jsonl", DEEP + b"\n"),
        "blob.txt": ("blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10),
        "long.jsonl": ("long.jsonl", b'{"text": "ok"}\n{"text": "' + b"a" * (2 << 20) + b'"}\n'),
    }
    fname, data = files[kind]
    (inputs / fname).write_bytes(data)
    out = tmp_path / "outdir" / "data"
    out.parent.mkdir()
    run_refused(capsys, ["prepare", inputs / fname, "--out", out, "--quiet", *flags], names, [inputs])
    assert not out.exists()
    _no_leftovers(out.parent)


def test_utf16_with_a_byte_order_mark_is_read_as_text(tmp_path):
    from owngpt.data.datadir import open_data_dir

    text = "床前明月光，疑是地上霜。\nHello, world.\n"
    for enc in ("utf-16", "utf-16-be", "utf-32"):
        src = tmp_path / f"{enc}.txt"
        bom = {"utf-16-be": b"\xfe\xff"}.get(enc, b"")
        src.write_bytes(bom + text.encode(enc))
        out = tmp_path / f"out-{enc}"
        assert (
            main(["prepare", str(src), "--out", str(out), "--tokenizer", "char", "--val-fraction", "0", "--quiet"]) == 0
        )
        d = open_data_dir(out)
        tok = d.load_tokenizer()
        ids = d.tokens("train").tolist()
        assert tok.decode(ids[:-1]) == text.strip()


def test_one_long_line_is_prepared_in_bounded_pieces(tmp_path):
    """A line longer than --max-memory-mb/16 becomes consecutive documents; nothing of it is lost or changed."""
    from owngpt.data.datadir import open_data_dir

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "床前明月光"]
    line = " ".join(words[i % 6] for i in range(400_000))  # ~2.7 M characters, one line, no newline
    src = tmp_path / "line.txt"
    src.write_text(line, encoding="utf-8")
    out = tmp_path / "data"
    code = main(
        [
            str(a)
            for a in ("prepare", src, "--out", out, "--tokenizer", "char", "--max-memory-mb", "16")
            + ("--val-fraction", "0", "--quiet")
        ]
    )
    assert code == 0
    d = open_data_dir(out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert "long_document_split" in json.dumps(report)
    tok = d.load_tokenizer()
    ids = d.tokens("train").tolist()
    eos = tok.eos_token_id
    assert ids.count(eos) == d.meta["splits"]["train"]["documents"] >= 2
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    # each document is stripped by cleaning, so the seams lose only the space they fell next to (if any)
    assert "".join(docs).replace(" ", "") == line.replace(" ", "")
    assert all(len(doc) <= 2 << 20 for doc in docs)  # a flush at 1M characters, plus at most one 1 MB piece


@pytest.mark.parametrize("window", [200, 1000])
def test_safe_pieces_tokenize_exactly_as_the_whole(window):
    """The oracle: BPE over the whole text vs over the pieces, on texts full of spaces, newlines and CJK."""
    import random

    from owngpt import tokenizer as T
    from owngpt.data.prepare import _safe_pieces

    rng = random.Random(window)
    # words joined by spaces, with runs of spaces, tabs, newlines, digits, contractions and CJK among them
    parts = ["the", "cat", " ", "  ", "\n", "\n\n", "x1", "'s", "。", "好", ",", "\t", "word", "好好。"]
    seps = [" ", " ", " ", "", "\n", "  \n", "\t\n"]
    texts = ["".join(rng.choice(parts) + rng.choice(seps) for _ in range(2000)) for _ in range(20)]
    enc = T.plain_backend(T.train_bpe(texts, vocab_size=400))
    for text in texts:
        pieces = _safe_pieces(text, window)
        assert "".join(pieces) == text and all(len(p) <= window for p in pieces) and len(pieces) > 1
        assert sum(T.encode_batch(enc, pieces), []) == T.encode_batch(enc, [text])[0]


# --- other hostile settings ---------------------------------------------------------------------------------------------


def test_hostile_flags_are_refused(tiny_ckpt, tiny_lm_data, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_hub(*a, **k):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr("owngpt.models._fetch_hub", no_hub)
    msg = run_refused(
        capsys, ["train", "--model", "runs/bse", "--data", tiny_lm_data, "--out", tmp_path / "r"], "runs/bse", [runs]
    )
    assert "did you mean" in msg and "base" in msg
    run_refused(capsys, ["generate", "./nope/ckpt", "--prompt", "x"], "./nope/ckpt", [runs])
    args = ["train", "--model", "tiny", "--data", tiny_lm_data, "--out", tmp_path / "r", "--lr", "nan"]
    run_refused(capsys, args, "lr=nan", [tiny_lm_data])
    run_refused(capsys, ["serve", tiny_ckpt, "--api-key", " "], "--api-key", [tiny_ckpt])
    assert not (tmp_path / "r").exists()


# --- the server's limits --------------------------------------------------------------------------------------------------


def _call(mw, scope: dict, messages: list[dict]) -> tuple[int, dict, bool]:
    """Drive an ASGI middleware; returns (status, JSON body, whether the app behind it was reached)."""
    sent: list[dict] = []
    reached = []

    async def app(scope, receive, send):
        reached.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        if not messages:
            raise AssertionError("the middleware read past the end of the body")
        return messages.pop(0)

    async def send(m):
        sent.append(m)

    mw.app = app
    asyncio.run(mw(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), bool(reached)


def _scope(path: str, length: int | None = None) -> dict:
    headers = [(b"content-type", b"application/json")] + ([(b"content-length", str(length).encode())] if length else [])
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


def test_the_body_limit_answers_before_reading_the_body():
    from owngpt.serve.limits import RequestLimits

    mw = RequestLimits(None, max_body_bytes=1000, max_prompt_chars=50)
    status, body, reached = _call(mw, _scope("/v1/completions", 20 << 20), [])  # not one body message is read
    assert status == 413 and body["error"]["code"] == "request_too_large" and not reached
    chunk = {"type": "http.request", "body": b"x" * 600, "more_body": True}
    status, _, reached = _call(mw, _scope("/v1/completions"), [chunk, dict(chunk), dict(chunk)])  # chunked
    assert status == 413 and not reached
    long_prompt = json.dumps({"model": "m", "prompt": "y" * 51}).encode()
    status, body, reached = _call(
        mw, _scope("/v1/completions", len(long_prompt)), [{"type": "http.request", "body": long_prompt}]
    )
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and not reached
    # a chat's turns are cut to the context by owngpt.conversation (a long conversation is answered from its latest
    # turns): only its system message must fit whole
    long_chat = {"model": "m", "messages": [{"role": "user", "content": "z" * 30}] * 3}
    body = json.dumps(long_chat).encode()
    status, _, reached = _call(mw, _scope("/v1/chat/completions", len(body)), [{"type": "http.request", "body": body}])
    assert status == 200 and reached
    long_system = {
        "model": "m",
        "messages": [{"role": "system", "content": "z" * 51}, {"role": "user", "content": "hi"}],
    }
    body = json.dumps(long_system).encode()
    status, body, reached = _call(
        mw, _scope("/v1/chat/completions", len(body)), [{"type": "http.request", "body": body}]
    )
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and not reached
    fits = json.dumps({"model": "m", "prompt": "y" * 50}).encode()
    status, _, reached = _call(mw, _scope("/v1/completions", len(fits)), [{"type": "http.request", "body": fits}])
    assert status == 200 and reached
    deep = b"[" * 50_000 + b"]" * 50_000
    mw.max_body_bytes = 1 << 20
    status, body, reached = _call(mw, _scope("/v1/completions", len(deep)), [{"type": "http.request", "body": deep}])
    assert status == 400 and not reached


def test_the_prompt_bound_is_exact_for_the_vocabulary():
    """No text longer than context x longest token fits the context: checked against the real tokenizer."""
    from owngpt.serve.limits import prompt_char_limit

    tok = fixtures.char_tokenizer()
    limit = prompt_char_limit(tok, 8)
    longest = max(len(t) for t in tok.get_vocab())
    assert limit == 8 * longest
    for text in ("a" * (limit + 1), "床" * (limit + 1), "\x00" * (limit + 1)):
        assert len(tok.encode(text, add_special_tokens=False)) > 8


def test_the_server_refuses_a_large_body_and_still_answers_health(tiny_ckpt):
    from fastapi.testclient import TestClient

    from owngpt.serve.app import create_app
    from owngpt.serve.engine import load

    app = create_app(loaded=load(tiny_ckpt, max_queue=2), api_key="k" * 12, model_name="m")
    with TestClient(app) as c:
        auth = {"Authorization": "Bearer " + "k" * 12}
        r = c.post("/v1/completions", content=b'{"prompt": "' + b"a" * (3 << 20) + b'"}', headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/completions", json={"model": "m", "prompt": "a" * 200_000, "max_tokens": 1}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": "m", "prompt": "ROMEO:", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200
        # a long conversation (the chat page after many turns, far past the context in characters) is answered
        # from its latest turns, as `owngpt chat` answers it; it was refused with 400 context_length_exceeded
        turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "x" * 300} for i in range(99)]
        body = {"model": "m", "messages": turns, "max_tokens": 6, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
    import owngpt

    assert r.json()["choices"][0]["message"]["content"] == owngpt.load(tiny_ckpt).chat(
        turns, max_new_tokens=6, temperature=0
    )


def test_a_terminated_prepare_leaves_no_temporary_dir(tmp_path):
    """SIGTERM (kill, docker stop) unwinds like an error: the temporary build dir is removed, nothing is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "big.txt"
    src.write_text(("one two three four five six seven eight nine ten\n" * 20) * 20_000, encoding="utf-8")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "owngpt", "prepare", str(src), "--out", str(out_parent / "data"), "--quiet"]
    proc = subprocess.Popen(cmd + ["--doc-sep", "line"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(out_parent.iterdir()):  # wait until the build has started (its temporary dir exists)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "prepare did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not list(out_parent.iterdir()), "a temporary dir was left behind"
    assert b"Traceback" not in proc.stderr.read()


def test_a_nan_loss_before_any_checkpoint_claims_none(tiny_lm_data, tmp_path, capsys):
    """Weights holding NaN give a NaN loss from step 1 (read at the next log step): the message must not point at a checkpoint that is not there."""
    import torch

    ckpt = tmp_path / "nan"
    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    from owngpt.checkpoint import save_checkpoint

    save_checkpoint(ckpt, model, tok, {"task": "lm", "step": 0})
    out = tmp_path / "run"
    code = main(["train", "--model", str(ckpt), "--data", str(tiny_lm_data), "--out", str(out), "--max-steps", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "loss became nan" in err and "Traceback" not in err  # read at the next log step
    assert "checkpoints/last holds" not in err and not (out / "checkpoints" / "last").exists()


# --- what must still load ------------------------------------------------------------------------------------------------


def test_a_masked_lm_without_pooler_still_becomes_a_classifier(tmp_path):
    """BERT/RoBERTa masked-LM checkpoints have no pooler: fine-tuning one into a classifier makes it fresh, as
    transformers does; the strict checks must not refuse that, nor BERT's unsaved position_ids buffer."""
    from transformers import BertConfig, BertForMaskedLM

    from owngpt.checkpoint import check_dir, load_model

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    assert check_dir(tmp_path / "mlm")
    model = load_model(tmp_path / "mlm", task="classify", ignore_mismatched_sizes=True, num_labels=3)
    assert model.config.num_labels == 3 and model.bert.pooler is not None


def test_serve_on_a_busy_port_is_an_error_line_before_the_model_loads(tiny_ckpt, capsys, monkeypatch):
    """uvicorn found the port taken only after loading the model, logged `ERROR: [Errno 98]` and exited 3."""
    import socket

    import owngpt.serve.app

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(owngpt.serve.app, "create_app", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = run_refused(capsys, ["serve", tiny_ckpt, "--port", port, "--api-key", "k" * 12], "--port", [tiny_ckpt])
    assert "already in use" in msg and f"--port {port + 1}" in msg
