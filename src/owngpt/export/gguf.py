"""`owngpt export --to gguf`: a GGUF file for llama.cpp (GPT-2 and LLaMA architectures, llama.cpp's tensor names and
metadata, written with the `gguf` package), and the llama.cpp runner (llama-cpp-python, where installed) that
measures it for the export's report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owngpt.errors import CheckpointError, ConfigError, require
from owngpt.measure import threads
from owngpt.outdir import CHECKPOINT, replacing

GGUF_TYPES = ("f32", "f16", "q8_0")  # --gguf-type choices: llama.cpp's own converter's names for the same file types
SPM_SPACE = "\u2581"  # llama.cpp's SentencePiece tokenizer spells a space as U+2581 ("▁") in token texts


def _is_byte_level(tokenizer: Any) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", []) or []]
    return "ByteLevel" in kinds


def gguf_tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The tokenizer in one of llama.cpp's tokenizer models, in id order, padded to the vocab (llama.cpp needs a
    token per embedding row). Keys: model and pre (tokenizer.ggml.model / .pre), tokens, types, merges (or None).

    - A byte-level BPE (GPT-2's, or one owngpt trained): model `gpt2`, pre-tokenizer `gpt-2` (owngpt's BPE splits
      with GPT-2's regex), tokens and merges as they are.
    - A char-level vocabulary (a BPE model without merges, with byte fallback: owngpt's `--tokenizer char`): model
      `llama`, llama.cpp's SentencePiece tokenizer, which is the same algorithm here: each character that is a token
      stays one, any other becomes its UTF-8 bytes as the `<0xNN>` tokens (type BYTE), with no merges because no
      two characters form a token. Spaces are spelled U+2581 as that tokenizer expects, and no space is put in
      front of the text (add_space_prefix false). Writing it as a byte-level BPE instead does not work: a
      multi-byte character needs merges through partial symbols that are no token, and llama.cpp's BPE drops the
      non-ASCII bytes of such a symbol when a character is unknown (measured: 床 came out as one token, not three).
    Added tokens are CONTROL when the tokenizer marks them special (parsed from text only with parse_special, as
    the chat template's markers are), USER_DEFINED otherwise: the rule of llama.cpp's own converter.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    merges_in = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"gguf export needs a BPE tokenizer (byte-level, or char-level with byte fallback); this one is "
            f"{model.get('type')!r}: use `--to hf` (then llama.cpp's convert_hf_to_gguf.py) or `--to onnx` instead"
        )
    byte_level = _is_byte_level(tokenizer)
    vocab = tokenizer.get_vocab()
    if not byte_level and (
        merges_in
        or not model.get("byte_fallback")
        or spec.get("normalizer")
        or spec.get("pre_tokenizer")
        or any(f"<0x{b:02X}>" not in vocab for b in range(256))
    ):
        raise CheckpointError(
            "gguf export writes byte-level BPE tokenizers and char-level ones (no merges, byte fallback with all 256 "
            "<0xNN> tokens, no normalizer or pre-tokenizer); this one is neither, so llama.cpp could not split text "
            "as owngpt does: use `--to hf` (then llama.cpp's convert_hf_to_gguf.py) or `--to onnx`"
        )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    texts = [tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None for i in range(vocab_size)]
    tokens, types, seen = [], [], set()
    for i, t in enumerate(texts):
        ttype = gguf.TokenType.NORMAL
        if t is None:  # the model's embedding may be padded beyond the tokenizer
            t, ttype = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            ttype = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif not byte_level:
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                ttype = gguf.TokenType.BYTE
            elif SPM_SPACE in t:
                raise CheckpointError(
                    f"gguf export: the char vocabulary holds U+2581 ({SPM_SPACE!r}, id {i}), which llama.cpp's "
                    "tokenizer uses for a space; use `--to hf` or `--to onnx`"
                )
            else:
                t = t.replace(" ", SPM_SPACE)
        if t in seen:
            raise CheckpointError(f"gguf export: token text {t!r} (id {i}) occurs twice; llama.cpp needs unique tokens")
        seen.add(t)
        tokens.append(t)
        types.append(ttype)
    if byte_level:
        # GGUF cannot store an empty array and llama.cpp's gpt2 tokenizer requires merges: a byte-level BPE without
        # any gets one that never applies (its left side is two symbols that no merge forms)
        merges = merges_in or ["ĠĠ Ġ"]
        return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges}
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "merges": None}


def llama_cpp_rope_permute(w: Any, n_head: int) -> Any:
    """Reorder q_proj/k_proj rows for llama.cpp's LLaMA rotary embedding.

    transformers rotates the pairs (i, i + head_dim/2) of each head (rotate_half); llama.cpp's LLaMA graph rotates
    adjacent pairs (2i, 2i+1). Interleaving the two halves of each head's rows makes the second compute the first:
    the same permutation as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_type(gname: str, ndim: int, dtype: str) -> Any:
    """The GGML type a tensor is stored in, by the rule llama.cpp's convert_hf_to_gguf.py applies (ModelBase.
    prepare_tensors): 1-D tensors and norms stay f32 (most of llama.cpp's kernels take them only in f32), so does the
    position embedding (added to activations, not multiplied); every other matrix, token_embd and output included,
    gets the file's type (`dtype`)."""
    import gguf

    t = gguf.GGMLQuantizationType
    if ndim <= 1 or gname.endswith("_norm.weight") or gname.startswith("position_embd."):
        return t.F32
    return {"f32": t.F32, "f16": t.F16, "q8_0": t.Q8_0}[dtype]


def export_gguf(model: Any, tokenizer: Any, out: Path, dtype: str = "f16") -> Path:
    """A GGUF file for llama.cpp (GPT-2 or LLaMA architecture): tensor names mapped with gguf's own name maps.

    GPT-2's Conv1D weights are stored [in, out]; GGUF (like nn.Linear) wants [out, in], so they are transposed.
    LLaMA's q/k projections are permuted for llama.cpp's rotary layout (llama_cpp_rope_permute).
    Each tensor's type follows llama.cpp's converter (gguf_tensor_type): 1-D tensors, norms and the position table
    f32, the other matrices `dtype` (f32, f16, or q8_0: blocks of 32 weights with one f16 scale, gguf's quantizer).
    """
    import numpy as np
    import torch

    gguf = require("gguf", "export")
    cfg = model.config
    arch = getattr(cfg, "model_type", None)
    if arch not in ("gpt2", "llama"):
        raise CheckpointError(
            f"gguf export supports the GPT-2 and LLaMA architectures (this checkpoint is {cfg.model_type!r}); "
            "export with `owngpt export CKPT --out DIR --to hf` and convert DIR with llama.cpp's convert_hf_to_gguf.py"
        )
    if dtype not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {dtype}: choose one of {', '.join(GGUF_TYPES)}")
    from transformers.pytorch_utils import Conv1D

    fields = gguf_tokenizer_fields(tokenizer, cfg.vocab_size)
    n_layer = cfg.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, n_layer)
    conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    with replacing(out, kind=CHECKPOINT, overwrite=True, create=True) as tmp:  # built aside, swapped in
        f = tmp / "model.gguf"
        w = gguf.GGUFWriter(str(f), arch)
        w.add_name(Path(str(getattr(cfg, "name_or_path", "") or "owngpt")).name or "owngpt")
        w.add_block_count(n_layer)
        if arch == "llama":
            heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            rope = getattr(cfg, "rope_parameters", None) or {}
            if rope.get("rope_type", "default") != "default":
                raise CheckpointError(
                    f"gguf export: rope scaling {rope.get('rope_type')!r} is not written by owngpt; export with "
                    "--to hf and convert with llama.cpp's convert_hf_to_gguf.py"
                )
            # the trained context, not the position table: llama.cpp would otherwise read untrained positions
            w.add_context_length(getattr(model, "owngpt_context", None) or cfg.max_position_embeddings)
            w.add_embedding_length(cfg.hidden_size)
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count(heads)
            w.add_head_count_kv(kv_heads)
            w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
            w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
            w.add_rope_dimension_count(head_dim)
            w.add_vocab_size(cfg.vocab_size)
        else:
            ctx = getattr(model, "owngpt_context", None) or cfg.n_positions
            w.add_context_length(ctx)
            w.add_embedding_length(cfg.n_embd)
            w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
            w.add_head_count(cfg.n_head)
            w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        ftypes = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
        w.add_file_type(getattr(gguf.LlamaFileType, ftypes[dtype]))
        w.add_tokenizer_model(fields["model"])
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        if fields["merges"] is not None:
            w.add_token_merges(fields["merges"])
        else:  # SentencePiece: no merges (scores rank them; none apply), no space put in front of the text
            w.add_token_scores([0.0] * len(fields["tokens"]))
            w.add_add_space_prefix(False)
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        if bos is not None:
            w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
        if tokenizer.pad_token_id is not None:
            w.add_pad_token_id(tokenizer.pad_token_id)
        w.add_add_bos_token(False)  # owngpt's models are trained without a BOS token in front
        if getattr(tokenizer, "chat_template", None):
            w.add_chat_template(tokenizer.chat_template)
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                if arch == "gpt2":
                    # llama.cpp's GPT-2 graph requires `output.weight` ("missing tensor 'output.weight'") and its
                    # own converter writes the tied embedding again under that name; LLaMA reuses token_embd.
                    name = "lm_head.weight"
                    gname = "output.weight"
                else:
                    continue  # llama.cpp's LLaMA reuses token_embd when output.weight is absent (tied embeddings)
            else:
                gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise CheckpointError(f"gguf export: no llama.cpp name for tensor {name}")
            t = t.detach().to(torch.float32)
            if gname == "position_embd.weight":
                # llama.cpp requires exactly context_length rows (`position_embd.weight has wrong shape`): the
                # trained ones; the rows past the trained context were never trained
                t = t[:ctx]
            if name in conv:
                t = t.t()
            elif arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                t = llama_cpp_rope_permute(t, heads if ".q_proj." in name else kv_heads)
            a = np.ascontiguousarray(t.numpy())
            qtype = gguf_tensor_type(gname, a.ndim, dtype)
            try:
                data = gguf.quants.quantize(a, qtype)
            except gguf.QuantError:
                # q8_0 needs rows that are a multiple of 32; llama.cpp's converter falls back to f16 the same way
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tokenizer.save_pretrained(tmp)  # for reference: the same tokenizer owngpt uses
    return out / "model.gguf"


# ------------------------------------------------------------------------------------------------- run in llama.cpp
def find_llama_cpp() -> Any:
    """llama-cpp-python where installed (optional: it compiles llama.cpp on install), else None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


class LlamaCppLM:
    """A GGUF export run by llama.cpp itself (through llama-cpp-python) for the report: greedy decode, perplexity."""

    def __init__(self, path: Path, n_ctx: int, llama_cpp: Any):
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads(), logits_all=True, verbose=False
        )

    def decode_speed(self, prompt: Sequence[int], n_tokens: int) -> float:
        """Greedy tokens/s, prompt included (as transformers' generate is timed for the original)."""
        import numpy as np

        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(list(prompt))
        for _ in range(n_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return n_tokens / (time.perf_counter() - t)

    def perplexity(self, tokens: Any, block_size: int) -> float:
        """exp(mean NLL) in windows of `block_size` overlapping by one token, as owngpt.evaluate scores the original."""
        import numpy as np

        total, count = 0.0, 0
        for s in range(0, len(tokens) - 1, block_size):
            x = [int(t) for t in tokens[s : s + block_size]]
            y = np.asarray(tokens[s + 1 : s + 1 + block_size], dtype=np.int64)
            x = x[: len(y)]
            self.llm.reset()
            self.llm.eval(x)
            lg = np.asarray(self.llm.scores[: len(x)], dtype=np.float64)
            m = lg.max(-1, keepdims=True)
            logz = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
            total += float((logz - lg[np.arange(len(y)), y]).sum())
            count += len(y)
        return math.exp(total / max(count, 1))
