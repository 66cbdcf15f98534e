"""`owngpt export --to gguf` files run in llama.cpp itself (through llama-cpp-python, which builds llama.cpp from
source): they load, llama.cpp's tokenizer gives owngpt's token ids, its logits are owngpt's, and its greedy
continuation of a prompt is owngpt's, for GPT-2 and LLaMA checkpoints with a char-level, a byte-level BPE (trained by
owngpt) and GPT-2's own tokenizer, in f32, f16 and q8_0.

Skipped without llama-cpp-python (`pip install -e ".[gguf-check]"`: a source build of llama.cpp, minutes, so it is
not in the `dev` extra). Oracle: owngpt's own generation path (load_for_generation + generate_batch) on the same
checkpoint. The models are tiny and trained for a few dozen steps on Shakespeare and Tang poems, so that the argmax
has a real margin (a random tiny model's logits are nearly flat and f16 rounding would flip its greedy ties).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fixtures
from owngpt.checkpoint import save_checkpoint
from owngpt.export import export
from owngpt.generation import SamplingParams, encode_prompt, generate_batch, load_for_generation

llama_cpp = pytest.importorskip("llama_cpp")

SAMPLE = Path(__file__).parents[1] / "src" / "owngpt" / "sample_data"
CORPUS = (SAMPLE / "tinyshakespeare.txt").read_text("utf-8")[:6000] + (SAMPLE / "tang300.txt").read_text("utf-8")[:3000]
CONTEXT = 64  # trained_context of the test checkpoints (the window they are trained on); the GGUF states it
N_NEW = 24
PROMPTS = ["ROMEO:\nBut, soft! what light", "床前明月光，疑是"]
# Texts llama.cpp must split into owngpt's ids: Chinese (seen in training and not), digits, runs of spaces and
# newlines, contractions, punctuation, an emoji (4 UTF-8 bytes), Latin-1 letters.
TOKENIZE = [
    *PROMPTS,
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "鹅鹅鹅，曲项向天歌 — 龘 and 𠀋",
    "It's 2026-11-30, they'll pay 1234567 coins!!  Really?\n\n\n   indented\ttab",
    "naïve café, Ærø; emoji 🙂 end   ",
]
# max |logit - owngpt's logit| accepted per --gguf-type, as a fraction of the largest |logit| (over prompt and
# continuation). Measured here on models whose logits reach 6-11: f32 (with an f32 KV cache) 3e-7 for LLaMA and 8e-5
# for GPT-2 (ggml's GELU reads an f16 table); f16 5e-4; q8_0 0.4-1.1%, 2.2% on the Muon-trained llama-tiny (the
# weights' rounding alone, run in PyTorch, gives about half of it; llama.cpp also rounds activations to 8 bits).
TOLERANCE = {"f32": 2e-4, "f16": 1.5e-3, "q8_0": 4e-2}


def _tokenizer(kind: str):
    from owngpt.tokenizer import char_tokenizer, gpt2_tokenizer, train_bpe

    if kind == "char":
        return char_tokenizer([CORPUS])
    if kind == "bpe":
        return train_bpe([CORPUS], vocab_size=512)
    return gpt2_tokenizer()  # GPT-2's own vocab.json + merges.txt, bundled with owngpt


def _checkpoint(path: Path, arch: str, tok_kind: str, steps: int) -> Path:
    """A tiny model trained for `steps` AdamW steps on CORPUS (1 thread, seeded), saved as an owngpt checkpoint."""
    tok = _tokenizer(tok_kind)
    build = fixtures.tiny_llama if arch == "llama" else fixtures.tiny_gpt2
    model = build(tok, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0).train()
    ids = torch.tensor(tok(CORPUS, add_special_tokens=False)["input_ids"]) if steps else None
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - CONTEXT, (8,), generator=g)
        x = torch.stack([ids[s : s + CONTEXT] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    meta = {"task": "lm", "source": {"kind": "preset", "name": "test-tiny"}, "step": steps, "trained_context": CONTEXT}
    return save_checkpoint(path, model, tok, meta)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(arch, tokenizer kind, steps): built once per module."""
    made: dict[tuple[str, str, int], Path] = {}

    def get(arch: str, tok_kind: str, steps: int = 60) -> Path:
        key = (arch, tok_kind, steps)
        if key not in made:
            made[key] = _checkpoint(tmp_path_factory.mktemp("ck") / f"{arch}-{tok_kind}-{steps}", *key)
        return made[key]

    return get


def _gguf(ckpt: Path, tmp_path: Path, dtype: str) -> str:
    export(ckpt, tmp_path / f"gguf-{dtype}", "gguf", measure_result=False, gguf_type=dtype)
    return str(tmp_path / f"gguf-{dtype}" / "model.gguf")


def _llama(path: str, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=CONTEXT, n_threads=1, n_batch=CONTEXT, verbose=False, **kw)


@pytest.mark.parametrize("tok_kind", ["char", "bpe", "gpt2"])
def test_llama_cpp_tokenizes_like_owngpt(checkpoints, tmp_path, tok_kind):
    """llama.cpp's tokenizer over the exported vocab gives owngpt's ids and text back, with no BOS added (owngpt's
    models are trained without one), and parses the chat template's special tokens as single tokens."""
    ckpt = checkpoints("gpt2", tok_kind, steps=0)  # the weights play no part here
    llm = _llama(_gguf(ckpt, tmp_path, "f32"), vocab_only=True)
    tok = load_for_generation(str(ckpt)).tokenizer
    for text in TOKENIZE:
        ours = encode_prompt(tok, text)
        assert llm.tokenize(text.encode("utf-8")) == ours, text  # add_bos=True: the file says not to add one
        assert llm.detokenize(ours).decode("utf-8") == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi, 你好"}], tokenize=False, add_generation_prompt=True
    )
    assert llm.tokenize(chat.encode("utf-8"), special=True) == encode_prompt(tok, chat)
    assert llm.token_eos() == tok.eos_token_id


CASES = [
    (arch, tok_kind, dtype)
    for arch, tok_kind in (("gpt2", "char"), ("gpt2", "bpe"), ("llama", "char"), ("llama", "bpe"))
    for dtype in ("f32", "f16", "q8_0")
]


@pytest.fixture(scope="module")
def owngpt_greedy(checkpoints):
    """owngpt's greedy continuation of each prompt (its generation engine) and its logits over prompt + continuation
    (a full forward pass), per checkpoint: the oracle, computed once for the three GGUF types."""
    made: dict[Path, list[tuple[str, list[int], Any, Any, str]]] = {}

    def get(ckpt: Path):
        if ckpt not in made:
            lm = load_for_generation(str(ckpt))
            made[ckpt] = []
            for prompt in PROMPTS:
                ids = encode_prompt(lm.tokenizer, prompt)
                want = generate_batch(
                    lm.model, lm.tokenizer, [ids], SamplingParams(max_new_tokens=N_NEW, temperature=0)
                )
                with torch.no_grad():
                    ref = lm.model(torch.tensor([ids + want[0].token_ids])).logits[0].numpy()
                text = lm.tokenizer.decode(want[0].token_ids, skip_special_tokens=True)
                made[ckpt].append((prompt, ids, want[0], ref, text))
        return made[ckpt]

    return get


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (prompt in one batch, then one token at a time through its KV cache) and
    its logits at every position."""
    llm.reset()
    llm.eval(ids)
    got: list[int] = []
    for _ in range(n):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    return got, np.asarray(llm.scores[: llm.n_tokens])


def _assert_continues_like_owngpt(llm, cases, tolerance: float, min_steps: int = N_NEW // 2) -> None:
    """llama.cpp's greedy tokens are owngpt's, and its logits are within `tolerance` (relative to the largest logit)
    of owngpt's.

    Tokens are compared up to the first step where owngpt's top-2 logit margin is at most twice the logit error
    measured at that step: only there may rounding legitimately flip the argmax (and later steps then see other
    tokens). On the four 60-step test models that never happens within N_NEW tokens (margins >= 0.08, errors <= 0.03),
    so the whole continuation is compared; the bound keeps the test honest where other kernels round differently,
    and `min_steps` keeps it from shrinking away."""
    for prompt, ids, want, ref, text in cases:
        assert len(want.token_ids) == N_NEW  # no end-of-text within the horizon
        assert llm.tokenize(prompt.encode("utf-8")) == ids
        got, logits = _llama_cpp_greedy(llm, ids, N_NEW)
        err = np.abs(logits - ref).max(axis=-1)  # per position
        top2 = np.sort(ref[len(ids) - 1 : -1], axis=-1)[:, -2:]  # new token k is the argmax of row len(ids)-1+k
        close = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * err[len(ids) - 1 : -1])
        horizon = int(close[0]) if len(close) else N_NEW
        assert horizon >= min_steps, f"argmax margins too thin to compare: {horizon} steps"
        assert got[:horizon] == want.token_ids[:horizon], prompt
        if horizon == N_NEW:  # the text too: the tokenizer's decode (owngpt's engine text, `want.text`, starts with
            # U+FFFD when the prompt ends in byte-fallback characters: IncrementalDecoder's window, not the export)
            assert llm.detokenize(got).decode("utf-8", errors="replace") == text
        seen = slice(0, len(ids) + horizon)  # positions that saw the same tokens in both
        worst, scale = err[seen].max(), np.abs(ref[seen]).max()
        assert worst <= tolerance * scale, f"max |logit difference| {worst:.2e}, logits up to {scale:.2f}"


@pytest.mark.parametrize("arch,tok_kind,dtype", CASES)
def test_llama_cpp_continues_a_prompt_as_owngpt_does(checkpoints, owngpt_greedy, tmp_path, arch, tok_kind, dtype):
    """llama.cpp's logits over prompt and continuation are owngpt's within TOLERANCE[dtype], and its greedy
    continuation (one token at a time through its KV cache) is owngpt's, token for token and as text."""
    ckpt = checkpoints(arch, tok_kind)
    # f32: the file is checked with an f32 KV cache (llama.cpp's default f16 cache alone adds up to about 1e-3)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if dtype == "f32" else {}
    llm = _llama(_gguf(ckpt, tmp_path, dtype), logits_all=True, **kv)
    assert llm._model.n_ctx_train() == CONTEXT  # the trained context, from the file
    _assert_continues_like_owngpt(llm, owngpt_greedy(ckpt), TOLERANCE[dtype])


def test_llama_cpp_completion_api_gives_owngpt_text(checkpoints, owngpt_greedy, tmp_path):
    """What a user runs: llama-cpp-python's create_completion (its own tokenizer call, BOS rule from the file, greedy
    sampler at temperature 0) returns owngpt's greedy text; <|im_end|> ends a chat reply in llama.cpp too."""
    ckpt = checkpoints("llama", "bpe")
    llm = _llama(_gguf(ckpt, tmp_path, "q8_0"))
    for prompt, ids, _, _, text in owngpt_greedy(ckpt):
        out = llm.create_completion(prompt, max_tokens=N_NEW, temperature=0.0)
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["choices"][0]["text"] == text
    vocab = llm._model.vocab
    tok = load_for_generation(str(ckpt)).tokenizer
    eog = [i for i in range(len(tok)) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    assert eog == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)


def test_llama_tiny_preset_trained_by_owngpt_runs_in_llama_cpp(tiny_lm_data, owngpt_greedy, tmp_path):
    """owngpt's `llama-tiny` preset (RoPE, RMSNorm, SwiGLU 344, tied embeddings) trained by `owngpt train`: f32 and
    q8_0 load in llama.cpp and continue prompts as owngpt does. q8_0 stores ffn_down in f16 (its rows, 344, are no
    multiple of 32), as llama.cpp's converter would: llama.cpp runs the mixed file."""
    from gguf import GGMLQuantizationType, GGUFReader
    from train_helpers import quick_cfg

    from owngpt.train import train

    ckpt = train(
        quick_cfg(tiny_lm_data, tmp_path / "run", "llama-tiny", max_steps=40, eval_every=40, block_size=CONTEXT)
    ).last_checkpoint
    for dtype in ("f32", "q8_0"):
        path = _gguf(ckpt, tmp_path, dtype)
        types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
        if dtype == "q8_0":
            assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16
            assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if dtype == "f32" else {}
        llm = _llama(path, logits_all=True, **kv)
        assert llm._model.n_ctx_train() == CONTEXT
        _assert_continues_like_owngpt(llm, owngpt_greedy(ckpt), TOLERANCE[dtype])


def test_gpt2_tokenizer_checkpoint_runs_in_llama_cpp(checkpoints, owngpt_greedy, tmp_path):
    """GPT-2's own 50,257-token BPE (+ owngpt's chat tokens): the file loads, llama.cpp computes owngpt's logits and
    continues both prompts as owngpt does. Untrained weights (training at this vocab size takes too long for a test):
    in f32 the logit errors are so small that even their thin argmax margins hold over all 24 tokens here."""
    ckpt = checkpoints("gpt2", "gpt2", steps=0)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = _llama(_gguf(ckpt, tmp_path, "f32"), logits_all=True, **kv)
    assert llm.n_vocab() == 50260
    _assert_continues_like_owngpt(llm, owngpt_greedy(ckpt), TOLERANCE["f32"])


def test_export_report_measures_the_gguf_in_llama_cpp(tiny_ckpt, tiny_lm_data, tmp_path):
    """With llama-cpp-python installed, `owngpt export --to gguf --data D` measures the file in llama.cpp: its
    perplexity on the validation split is the original's (f32 exactly up to rounding, q8_0 close) and it decodes."""
    import json

    from owngpt.cli import main

    ppl = {}
    for dtype in ("f32", "q8_0"):
        out = tmp_path / dtype
        args = ["export", str(tiny_ckpt), "--out", str(out), "--to", "gguf", "--gguf-type", dtype]
        assert main([*args, "--data", str(tiny_lm_data), "--eval-tokens", "300", "--decode-tokens", "8"]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["result"]["decode_tokens_per_s"] > 0
        assert any("measured in llama.cpp" in n for n in rep["notes"])
        ppl[dtype] = rep["ratios"]["perplexity"]
    assert abs(ppl["f32"] - 1) < 1e-4 and abs(ppl["q8_0"] - 1) < 1e-2
