"""Tokenizers: train a byte-level BPE or a char-level tokenizer, load GPT-2's BPE or a checkpoint's tokenizer.

Every tokenizer owngpt builds is a `transformers.PreTrainedTokenizerFast` saved as a Hugging Face tokenizer dir, with
the special tokens of `owngpt.chat_format.SPECIAL_TOKENS` reserved and owngpt's chat template attached. The actual
tokenization algorithms are the `tokenizers` library's (Rust); this module only configures them so that
encode -> decode gives back any text exactly (byte-level pre-tokenization, or byte fallback for the char vocab).

Not here: reading or cleaning text (owngpt.data), rendering conversations (owngpt.chat_format).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from owngpt.chat_format import CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, adapt_pretrained_tokenizer
from owngpt.errors import CheckpointError, ConfigError

# GPT-2's vocab.json + merges.txt, bundled so that `--tokenizer gpt2` works offline (source in its README.md).
BUNDLED_GPT2 = Path(__file__).parent / "sample_data" / "gpt2_tokenizer"
# Files that make a directory a model (whose embedding rows are tied to its vocab), not just a tokenizer.
_MODEL_FILES = ("config.json",)


def default_vocab_size(train_chars: int) -> int:
    """A BPE vocab size for a corpus of `train_chars` characters: about one entry per 50 characters, in [512, 8000].

    Small corpora get small vocabs: each merge needs enough occurrences to be learned, and a tiny model spends a
    large share of its parameters on embeddings. Rounded to a multiple of 64 (friendlier matrix shapes).
    """
    v = max(512, min(8000, train_chars // 50))
    return int((v + 63) // 64 * 64)


def _wrap(tk, model_max_length: int | None = None):
    """Wrap a `tokenizers.Tokenizer` carrying SPECIAL_TOKENS as owngpt's PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    kw: dict[str, Any] = {}
    if model_max_length:
        kw["model_max_length"] = model_max_length
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        clean_up_tokenization_spaces=False,  # the default "cleanup" would eat spaces before punctuation
        **kw,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None, progress: bool = False
):
    """Train a byte-level BPE (GPT-2 style) on `texts`; SPECIAL_TOKENS get ids 0..3.

    Byte-level: every text is first mapped to bytes, so there is no unknown token and any string round-trips.
    `length` (number of texts, optional) only feeds the progress bar `tokenizers` shows when `progress` is set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE: use at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover the exact characters, chat_format derives loss masks from them.
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tk.train_from_iterator(texts, trainer=trainer, length=length)
    return _wrap(tk)


def char_tokenizer(texts: Iterable[str]):
    """A character-level tokenizer: every character in `texts` gets an id, plus the 256 byte tokens `<0x00>`..`<0xFF>`.

    Built as a BPE model without merges and with byte fallback: a character seen in training is one token, any other
    character falls back to its UTF-8 bytes, so every string round-trips. Ids: SPECIAL_TOKENS, bytes, then the
    characters in code-point order (deterministic).
    """
    from tokenizers import Tokenizer, decoders, models

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap(tk)


def gpt2_tokenizer(vocab: str | os.PathLike | None = None, merges: str | os.PathLike | None = None):
    """GPT-2's byte-level BPE from its `vocab.json` and `merges.txt` (default: the copy bundled with owngpt).

    Ids 0..50256 are GPT-2's (so "Hello world" is [15496, 995] and pretrained GPT-2 weights match); the chat
    tokens missing from GPT-2 (`<|pad|>`, `<|im_start|>`, `<|im_end|>`) are appended after them.
    Built with `tokenizers.models.BPE.from_file` and GPT-2's byte-level pre-tokenizer, decoder and post-processor:
    transformers 5's `GPT2Tokenizer(vocab_file=...)` returned no ids at all for plain text here (see NOTES.md).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = Path(vocab) if vocab else BUNDLED_GPT2 / "vocab.json"
    merges = Path(merges) if merges else BUNDLED_GPT2 / "merges.txt"
    for p, flag in ((vocab, "--gpt2-vocab"), (merges, "--gpt2-merges")):
        if not p.is_file():
            raise ConfigError(
                f"{p}: no such file; pass GPT-2's vocab.json and merges.txt with {flag}, "
                f"or `--tokenizer gpt2:DIR` for a dir holding both"
            )
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="")
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise ConfigError(f"{vocab} / {merges}: not a GPT-2 vocab.json + merges.txt pair ({e})") from e
    # GPT-2's pipeline, as tokenizers' ByteLevelBPETokenizer.from_file assembles it, through the public API
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens(list(SPECIAL_TOKENS))  # EOS already exists in GPT-2's vocab and keeps id 50256
    return _wrap(tk, model_max_length=1024)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a model (config.json), whose vocab is tied to its weights and must not change."""
    return any((Path(path) / f).is_file() for f in _MODEL_FILES)


def hf_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local Hugging Face dir, and whether it is a pretrained model's (kept unchanged).

    A tokenizer-only dir gets owngpt's special tokens and chat template when they are missing. A model dir keeps its
    tokenizer exactly as it is: new tokens would need new embedding rows that the pretrained weights do not have.
    """
    tok = load_tokenizer(path)
    pretrained = is_model_dir(path)
    if not pretrained:
        missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
        if tok.eos_token is None:
            tok.eos_token = EOS
        if tok.pad_token is None:
            tok.pad_token = PAD
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHAT_TEMPLATE
    else:  # a template written with the tokens it has, e.g. [SEP]-separated turns for a BERT-style vocab (UER)
        adapt_pretrained_tokenizer(tok)
    return tok, pretrained


def separator_token_id(tok) -> int:
    """The id written after each document: EOS, or SEP for BERT-style tokenizers that have no EOS."""
    for attr in ("eos_token_id", "sep_token_id"):
        tid = getattr(tok, attr, None)
        if isinstance(tid, int):
            return tid
    raise CheckpointError(
        "this tokenizer has neither an eos nor a sep token to separate documents: "
        "use another --tokenizer (bpe, char, gpt2)"
    )


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts at once without special tokens, through the Rust backend when there is one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets, which we do not need here
        fn = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in fn(texts, add_special_tokens=False)]
    return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def plain_backend(tok):
    """A copy of the tokenizer's Rust backend with truncation and padding off (some tokenizer.json files set them)."""
    from tokenizers import Tokenizer

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()

    class _Plain:  # only what encode_batch needs
        backend_tokenizer = copy

    return _Plain()


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer dir (a data dir's tokenizer/ or a checkpoint), never running remote code."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no tokenizer directory there")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except RecursionError:
        raise CheckpointError(
            f"{p}: a tokenizer file is nested too deeply to be real; copy the directory again"
        ) from None
    except Exception as e:  # tokenizers raises plain Exceptions for a damaged tokenizer.json
        where = _damaged_json(p) or (p / "tokenizer.json" if (p / "tokenizer.json").is_file() else p)
        raise CheckpointError(
            f"{where}: transformers could not load a tokenizer from it ({e}); the file is damaged: copy it again"
        ) from None
    _join_cjk_wordpieces(tok)
    _check_fits_the_model(tok, p)
    _check_chat_template(tok, p)
    return tok


def _damaged_json(p: Path) -> Path | None:
    """The tokenizer file that is not valid JSON, to name it (a damaged tokenizer_config.json was reported as a
    damaged tokenizer.json)."""
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        f = p / name
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RecursionError):
            return f
    return None


def _check_chat_template(tok, p: Path) -> None:
    """Refuse a chat template that does not compile, when loading instead of at the first reply (a damaged
    chat_template.jinja was a jinja2 TemplateSyntaxError traceback from `owngpt chat` and the server)."""
    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str):
        return
    from jinja2 import TemplateError

    try:  # transformers' own compiler: its extensions ({% generation %}) and filters, so a valid template passes
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - a transformers without it: left to the first reply
        return
    try:
        _compile_jinja_template(template)
    except TemplateError as e:
        where = p / "chat_template.jinja" if (p / "chat_template.jinja").is_file() else p / "tokenizer_config.json"
        raise CheckpointError(
            f"{where}: the chat template is not valid Jinja ({e}); the file is damaged or was edited: copy it again "
            "from the run's other checkpoint or the data dir's tokenizer/"
        ) from None


def _check_fits_the_model(tok, p: Path) -> None:
    """Refuse a checkpoint's tokenizer whose vocabulary is larger than the model's embedding.

    A tokenizer.json copied from another model produced ids past the embedding: an IndexError traceback from
    torch in generate, chat, eval and serve, and export wrote the broken checkpoint out. The base vocabulary is
    compared (without added tokens: some Hub models add special tokens past their embedding that text never
    produces). A config.json that cannot be read is left to owngpt.checkpoint's checks, which name it.
    """
    import json

    try:
        rows = json.loads((p / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, RecursionError, AttributeError):
        return
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        return
    n = getattr(tok, "vocab_size", None)
    if isinstance(n, int) and n > rows:
        raise CheckpointError(
            f"{p / 'tokenizer.json' if (p / 'tokenizer.json').is_file() else p}: the tokenizer has {n:,} tokens but "
            f"config.json's vocab_size is {rows:,}: it belongs to another model; copy this checkpoint's own "
            "tokenizer files back (from the run's other checkpoint or the data dir's tokenizer/)"
        )


def _join_cjk_wordpieces(tok) -> None:
    """Decode BERT-style (WordPiece) vocabularies without spaces inside Chinese text.

    WordPiece treats every CJK character as a word and decodes "你好，" as "你 好 ，"; Chinese GPT-2 models with such
    vocabularies (UER gpt2-chinese, GPT2-chitchat) need the characters joined. The space WordPiece puts before a
    CJK character or full-width punctuation is dropped; Latin words keep theirs. transformers rebuilds a
    BertTokenizer's decoder on load, so this is applied on every load, not saved.
    """
    from tokenizers import Regex, decoders

    backend = getattr(tok, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    if not isinstance(dec, decoders.WordPiece):
        return
    cjk = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    # WordPiece's decode_chain gives each token with its leading space; the Replace then runs on each of them
    backend.decoder = decoders.Sequence([dec, decoders.Replace(Regex(f"^ (?=[{cjk}])"), "")])
