"""Tokenizers: exact round trips, GPT-2's ids, special tokens, chat template, loading with AutoTokenizer."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owngpt import chat_format as cf
from owngpt import tokenizer as T
from owngpt.data.prepare import _safe_pieces
from owngpt.errors import ConfigError

CORPUS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\tOK? 😀 café",
] * 20
SAMPLES = [
    "床前明月光，疑是地上霜。",
    "Hello, 世界! 🤖\n\ttabs",
    "  leading and trailing spaces  ",
    "mixed 中文 and English, numbers 12345, emoji 👨‍👩‍👧 and e\u0301 (combining)",
    "\n\n\t\r\n",
    "never seen: ᚠᛇᚻ ∮ E⋅da = Q, ﷺ",
]


@pytest.fixture(scope="module")
def bpe():
    return T.train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return T.char_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def gpt2():
    return T.gpt2_tokenizer()


@pytest.mark.parametrize("name", ["bpe", "char", "gpt2"])
def test_round_trip_chinese_english_emoji_whitespace(name, request):
    tok = request.getfixturevalue(name)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_bpe_round_trips_any_text(bpe, s):
    assert bpe.decode(bpe.encode(s, add_special_tokens=False)) == s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_char_round_trips_any_text(char, s):
    assert char.decode(char.encode(s, add_special_tokens=False)) == s


def test_gpt2_gives_gpt2s_ids_and_appends_the_chat_tokens(gpt2):
    assert gpt2.encode("Hello world", add_special_tokens=False) == [15496, 995]
    assert gpt2.eos_token_id == 50256 and gpt2.convert_ids_to_tokens(50256) == cf.EOS
    assert [gpt2.convert_tokens_to_ids(t) for t in (cf.PAD, cf.IM_START, cf.IM_END)] == [50257, 50258, 50259]
    assert len(gpt2) == 50260


def test_gpt2_from_a_dir_and_a_clear_error_for_missing_files(tmp_path):
    tok = T.gpt2_tokenizer(T.BUNDLED_GPT2 / "vocab.json", T.BUNDLED_GPT2 / "merges.txt")
    assert tok.encode("Hello world", add_special_tokens=False) == [15496, 995]
    with pytest.raises(ConfigError, match="--gpt2-vocab"):
        T.gpt2_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize("name", ["bpe", "char"])
def test_special_tokens_are_reserved_first_and_single_tokens(name, request):
    tok = request.getfixturevalue(name)
    assert [tok.convert_tokens_to_ids(t) for t in cf.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (cf.EOS, cf.EOS, cf.PAD)
    text = f"{cf.IM_START}user\nhi{cf.IM_END}\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 2 and 3 in ids


@pytest.mark.parametrize("name", ["bpe", "char", "gpt2"])
def test_saved_tokenizer_loads_with_autotokenizer_and_keeps_the_chat_template(name, request, tmp_path):
    from transformers import AutoTokenizer

    tok = request.getfixturevalue(name)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == cf.CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "你好 there"}, {"role": "assistant", "content": "Hi! 😀"}]
    assert loaded.apply_chat_template(msgs, tokenize=False) == cf.render_text(msgs)
    for s in SAMPLES:
        assert loaded.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
        assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_chat_loss_mask_covers_the_assistant_text_with_byte_level_tokenizers(name, request):
    tok = request.getfixturevalue(name)
    msgs = [{"role": "user", "content": "hi 你好"}, {"role": "assistant", "content": " Hello,\n 世界!"}]
    ids, mask = cf.render(tok, msgs)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Hello,\n 世界!" + cf.IM_END + "\n"


def test_char_vocab_is_deterministic_and_ordered():
    a, b = T.char_tokenizer(["bca", "😀"]), T.char_tokenizer(["😀a", "cb"])
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_tokens_to_ids(c) for c in "abc😀"] == [260, 261, 262, 263]  # specials, 256 bytes, then chars
    assert a.encode("z", add_special_tokens=False) == [4 + ord("z")]  # unseen char -> its byte token


def test_bpe_training_is_deterministic():
    a, b = T.train_bpe(CORPUS, vocab_size=400), T.train_bpe(CORPUS, vocab_size=400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_vocab_size_checks_and_defaults():
    with pytest.raises(ConfigError, match="--vocab-size"):
        T.train_bpe(CORPUS, vocab_size=100)
    assert T.default_vocab_size(1000) == 512
    assert T.default_vocab_size(10**9) == 8000
    assert T.default_vocab_size(100_000) == 2048 and T.default_vocab_size(100_000) % 64 == 0


def test_hf_dir_gets_missing_specials_but_a_model_dir_is_kept_unchanged(tmp_path, tiny_ckpt):
    # a tokenizer-only dir without owngpt's chat tokens: they are added
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer.from_file(str(T.BUNDLED_GPT2 / "vocab.json"), str(T.BUNDLED_GPT2 / "merges.txt"))
    PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer).save_pretrained(tmp_path / "tok")
    tok, pretrained = T.hf_tokenizer(tmp_path / "tok")
    assert not pretrained and all(t in tok.get_vocab() for t in cf.SPECIAL_TOKENS)
    assert tok.chat_template == cf.CHAT_TEMPLATE and tok.eos_token == cf.EOS
    # a model dir: its vocab must match its embeddings, so nothing is added
    before = T.load_tokenizer(tiny_ckpt)
    tok, pretrained = T.hf_tokenizer(tiny_ckpt)
    assert pretrained and tok.get_vocab() == before.get_vocab()


def test_long_documents_are_cut_where_tokenization_does_not_change(bpe, char):
    text = ("ROMEO:\nBut, soft! what light  through yonder window breaks?\n  indented\n\n" * 30).strip()
    pieces = _safe_pieces(text, 100)
    assert "".join(pieces) == text and len(pieces) > 5
    for tok in (bpe, char):
        whole = tok.encode(text, add_special_tokens=False)
        assert sum((tok.encode(p, add_special_tokens=False) for p in pieces), []) == whole


def test_gpt2_tokenizer_through_the_public_api_equals_the_byte_level_bpe_wrapper():
    # the oracle: tokenizers' own ByteLevelBPETokenizer.from_file (owngpt reached into its private _tokenizer before)
    import json

    from tokenizers import ByteLevelBPETokenizer

    from owngpt.chat_format import SPECIAL_TOKENS
    from owngpt.tokenizer import BUNDLED_GPT2, gpt2_tokenizer

    wrapper = ByteLevelBPETokenizer.from_file(str(BUNDLED_GPT2 / "vocab.json"), str(BUNDLED_GPT2 / "merges.txt"))
    wrapper.add_special_tokens(list(SPECIAL_TOKENS))
    ours = gpt2_tokenizer()
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(wrapper.to_str())
    text = "Hello world, 床前明月光 <|im_start|>user\n hi<|im_end|>"
    assert ours(text, add_special_tokens=False)["input_ids"] == wrapper.encode(text).ids
