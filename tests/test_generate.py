"""Generation engine and `owngpt generate`: oracles are transformers' generate and hand-written decoding loops."""

from __future__ import annotations

import pytest
import torch

import fixtures
from owngpt.commands.flags import unescape
from owngpt.errors import CheckpointError, ConfigError
from owngpt.generation import (
    IncrementalDecoder,
    SamplingParams,
    encode_prompt,
    generate_batch,
    load_for_generation,
)

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "A"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    return load_for_generation(str(tiny_ckpt))


def ids_of(lm, text):
    return encode_prompt(lm.tokenizer, text)


def greedy(n=30, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def test_greedy_equals_transformers_generate(lm, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, use_safetensors=True).eval()  # loaded independently
    for text in PROMPTS:
        ids = ids_of(lm, text)
        ref = ref_model.generate(
            torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
        )[0, len(ids) :].tolist()
        eos = lm.tokenizer.eos_token_id
        ref = ref[: ref.index(eos)] if eos in ref else ref
        (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy())
        assert res.token_ids == ref
        assert res.text == lm.tokenizer.decode(ref, skip_special_tokens=True)


def test_kv_cache_decoding_equals_full_recompute(lm):
    ids = ids_of(lm, PROMPTS[1])
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(40), eos_token_ids=[])
    seq = list(ids)
    with torch.no_grad():
        for _ in range(40):  # no cache: the whole sequence through the model at every step
            seq.append(int(lm.model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert res.token_ids == seq[len(ids) :]
    assert res.finish_reason == "length" and res.completion_tokens == 40


def test_batch_equals_one_by_one_for_greedy(lm):
    prompts = [ids_of(lm, t) for t in PROMPTS]  # different lengths: left padding must not change anything
    batch = generate_batch(lm.model, lm.tokenizer, prompts, greedy(25))
    for p, r in zip(prompts, batch, strict=True):
        (single,) = generate_batch(lm.model, lm.tokenizer, [p], greedy(25))
        assert r.token_ids == single.token_ids
        assert r.prompt_tokens == len(p)


def test_seed_reproduces_a_sample_and_another_seed_differs(lm):
    ids = [ids_of(lm, "KING")]
    p = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, seed=3)
    a = generate_batch(lm.model, lm.tokenizer, ids, p)[0]
    b = generate_batch(lm.model, lm.tokenizer, ids, p)[0]
    c = generate_batch(lm.model, lm.tokenizer, ids, p.replace(seed=4))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_seed_does_not_change_the_global_rng(lm):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate_batch(lm.model, lm.tokenizer, [ids_of(lm, "A")], SamplingParams(max_new_tokens=5, seed=9))
    assert torch.equal(torch.rand(3), expected)


def test_streamed_pieces_concatenate_to_the_text_per_row(lm):
    pieces: dict[int, list[str]] = {}
    prompts = [ids_of(lm, t) for t in PROMPTS[:2]]
    p = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, seed=1, num_return_sequences=2)
    res = generate_batch(
        lm.model, lm.tokenizer, prompts, p, streamer_callback=lambda row, t: pieces.setdefault(row, []).append(t)
    )
    assert [r.prompt_index for r in res] == [0, 0, 1, 1]
    for r in res:
        assert "".join(pieces.get(r.index, [])) == r.text
        whole = lm.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        # An untrained model emits invalid byte sequences; tokenizers' ByteFallback then turns the whole run of byte
        # tokens into U+FFFD while the stream keeps the valid bytes. Where the text is valid both agree.
        assert r.text == whole or "\ufffd" in whole


def test_incremental_decoder_never_splits_multibyte_characters():
    tok = fixtures.char_tokenizer()
    text = "Ay 好世界, 床前明月光 ok 🙂!"  # 好世界 and 🙂 are not in the char vocab: byte-fallback tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some characters really are split over several tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_with_gpt2_byte_level_bpe():
    from owngpt.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()  # GPT-2's BPE, bundled with owngpt: a CJK character is 2-3 byte-level tokens
    text = "Hello 床前明月光，疑是地上霜。 café 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok, tok("Say:", add_special_tokens=False)["input_ids"])
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # some tokens were held back until their character completed


def test_row_stream_of_byte_fallback_tokens_is_clean(lm):
    # A random model rarely emits a valid multi-byte sequence, so feed the ids of a known text through the per-row
    # machinery generate_batch streams with (the engine's Row, fed every step).
    from owngpt.engine import Row, RowSettings

    tok = lm.tokenizer
    out: list[str] = []
    row = Row(ids_of(lm, "x"), RowSettings(max_tokens=100, stop_ids=frozenset({tok.eos_token_id})))
    row.on_event = lambda _r, t, _fin: t and out.append(t)
    row.begin(tok, tok.eos_token_id)
    for t in tok("好好好 and 🙂", add_special_tokens=False)["input_ids"]:
        row.feed(t)
    row.finish("length")
    assert "".join(out) == "好好好 and 🙂" and all("\ufffd" not in p for p in out)


def test_repetition_penalty_matches_the_ctrl_rule_for_negative_logits(lm):
    ids = ids_of(lm, "ROMEO:")
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(30, repetition_penalty=1.8), eos_token_ids=[])
    seq, saw_negative = list(ids), False
    with torch.no_grad():
        for _ in range(30):
            logits = lm.model(torch.tensor([seq])).logits[0, -1].clone()
            seen = torch.tensor(sorted(set(seq)))
            s = logits[seen]
            saw_negative |= bool((s < 0).any())
            logits[seen] = torch.where(s < 0, s * 1.8, s / 1.8)  # CTRL: a penalty lowers negative logits too
            seq.append(int(logits.argmax()))
    assert saw_negative
    assert res.token_ids == seq[len(ids) :]
    (plain,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(30), eos_token_ids=[])
    assert plain.token_ids != res.token_ids


def test_no_repeat_ngram_size(lm):
    ids = ids_of(lm, "ROMEO:")
    (plain,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(30), eos_token_ids=[])
    seq = ids + plain.token_ids
    assert len({tuple(seq[i : i + 2]) for i in range(len(seq) - 1)}) < len(seq) - 1  # the greedy text repeats
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(30, no_repeat_ngram_size=2), eos_token_ids=[])
    seq = ids + res.token_ids
    bigrams = [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]
    assert len(bigrams) == len(set(bigrams))


def test_beam_search_equals_transformers(lm):
    ids = ids_of(lm, "KING")
    ref = lm.model.generate(
        torch.tensor([ids]),
        max_new_tokens=20,
        num_beams=3,
        do_sample=False,
        early_stopping=True,
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=lm.tokenizer.eos_token_id,
    )[0, len(ids) :].tolist()
    eos = lm.tokenizer.eos_token_id
    ref = ref[: ref.index(eos)] if eos in ref else ref
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(20, num_beams=3))
    assert res.token_ids == ref


def test_stop_string_cuts_the_text_and_is_never_streamed(lm):
    ids = ids_of(lm, "First")
    p = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, seed=5)
    (full,) = generate_batch(lm.model, lm.tokenizer, [ids], p, eos_token_ids=[])
    stop = full.text[10:12]
    cut = full.text[: full.text.find(stop)]
    out: list[str] = []
    (res,) = generate_batch(
        lm.model,
        lm.tokenizer,
        [ids],
        p.replace(stop=[stop]),
        eos_token_ids=[],
        streamer_callback=lambda _r, t: out.append(t),
    )
    assert res.text == cut and "".join(out) == cut
    assert res.finish_reason == "stop"
    assert res.completion_tokens < 40
    # with beam search (transformers' own StopStringCriteria) the text is cut the same way
    (g,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(40), eos_token_ids=[])
    stop = g.text[5:7]
    (b,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(40, num_beams=2, stop=[stop]), eos_token_ids=[])
    assert stop not in b.text


def test_cancel_one_row_leaves_the_others_running(lm):
    flags = [False, False]
    counts = [0, 0]

    def on_text(row, _t):
        counts[row] += 1
        if row == 0 and counts[0] == 3:
            flags[0] = True

    prompts = [ids_of(lm, "ROMEO:"), ids_of(lm, "KING")]
    p = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=0, seed=2)
    a, b = generate_batch(
        lm.model, lm.tokenizer, prompts, p, streamer_callback=on_text, stop_flags=flags, eos_token_ids=[]
    )
    assert a.finish_reason == "cancelled" and a.completion_tokens < 30
    assert b.finish_reason == "length" and b.completion_tokens == 30


def test_unconditional_starts_from_end_of_text(lm):
    eos = lm.tokenizer.eos_token_id
    ref = lm.model.generate(
        torch.tensor([[eos]]),
        max_new_tokens=15,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=[],
    )[0, 1:].tolist()
    (res,) = generate_batch(lm.model, lm.tokenizer, [[]], greedy(15), eos_token_ids=[])
    assert res.token_ids == ref


def test_long_prompt_is_read_through_the_last_context_tokens(lm):
    ids = ids_of(lm, "First Citizen:\n" * 20)
    assert len(ids) > 128
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], greedy(28), eos_token_ids=[])
    (ref,) = generate_batch(lm.model, lm.tokenizer, [ids[-128:]], greedy(28), eos_token_ids=[])
    assert res.token_ids == ref.token_ids and res.prompt_tokens == 128 and len(res.token_ids) == 28


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("top_p", 1.5, "--top-p"),
        ("top_p", 0.0, "--top-p"),
        ("temperature", -0.1, "--temperature"),
        ("top_k", -1, "--top-k"),
        ("max_new_tokens", 0, "--max-new-tokens"),
        ("num_beams", 0, "--num-beams"),
        ("repetition_penalty", 0.0, "--repetition-penalty"),
        ("no_repeat_ngram_size", -2, "--no-repeat-ngram-size"),
        ("stop", [""], "--stop"),
        ("seed", -1, "--seed"),
        ("temperature", float("nan"), "--temperature"),
    ],
)
def test_out_of_range_settings_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplingParams(**{field: value}).validate()


def test_any_length_slides_the_window_and_beam_search_is_refused_past_the_context(lm):
    (res,) = generate_batch(lm.model, lm.tokenizer, [[5]], greedy(300), eos_token_ids=[])
    assert len(res.token_ids) == 300 and res.finish_reason == "length"
    with pytest.raises(ConfigError, match="context of 128 tokens with beam search"):
        generate_batch(lm.model, lm.tokenizer, [[5]], greedy(128, num_beams=2))


def test_classify_checkpoint_is_refused_with_a_hint(tmp_path):
    ck = fixtures.save_tiny_checkpoint(tmp_path / "cls", task="classify")
    with pytest.raises(CheckpointError, match="owngpt predict"):
        load_for_generation(str(ck))


def test_unescape():
    assert unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    assert unescape("床\\n") == "床\n"


# --- the command -----------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    from owngpt.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_greedy_output_is_the_greedy_continuation(lm, tiny_ckpt, capsys):
    (ref,) = generate_batch(lm.model, lm.tokenizer, [ids_of(lm, "ROMEO:")], greedy(20))
    code, out, _ = run_cli(
        capsys, "generate", str(tiny_ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"
    )
    assert code == 0 and out == ref.text + "\n"
    code, out, _ = run_cli(
        capsys,
        "generate",
        str(tiny_ckpt),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
        "--echo",
        "--no-stream",
    )
    assert out == "ROMEO:" + ref.text + "\n"


def test_cli_same_seed_same_bytes_and_batches(tiny_ckpt, tmp_path, capsys):
    args = ["generate", str(tiny_ckpt), "--prompt", "KING", "--max-new-tokens", "20", "--seed", "3", "--top-p", "0.95"]
    assert run_cli(capsys, *args)[1] == run_cli(capsys, *args)[1]
    f = tmp_path / "prompts.txt"
    f.write_text("ROMEO:\n\nKING\n", encoding="utf-8")
    code, out, _ = run_cli(
        capsys,
        "generate",
        str(tiny_ckpt),
        "--prompt-file",
        str(f),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
    )
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("=====")] == [
        f"{'=' * 20} PROMPT {p} SAMPLE {s} {'=' * 20}" for p in (1, 2) for s in (1, 2)
    ]
    code, out, _ = run_cli(capsys, "generate", str(tiny_ckpt), "--num-samples", "2", "--max-new-tokens", "5")
    assert code == 0 and out.count("SAMPLE") == 2


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tiny_ckpt), "--top-p", "1.5")
    assert code == 2 and err.strip() == "error: --top-p 1.5: must be in (0, 1] (1 = no limit)"
    code, _, err = run_cli(capsys, "generate", str(tiny_ckpt), "--prompt-file", str(tmp_path / "nope.txt"))
    assert code == 2 and "--prompt-file" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "no such checkpoint" in err


def test_trained_context_rules(tmp_path):
    """What every loader reads: owngpt.json trained_context, else an old preset run's block, else the table."""
    from types import SimpleNamespace

    from owngpt.generation import trained_context
    from owngpt.model_init import trained_context_after

    cfg = SimpleNamespace(n_positions=256)
    assert trained_context({"trained_context": 64, "block_size": 64}, cfg) == 64
    assert trained_context({"block_size": 64, "source": {"kind": "preset"}}, cfg) == 64  # before the field existed
    assert trained_context({"block_size": 64, "source": {"kind": "checkpoint"}}, cfg) == 256  # e.g. fine-tuned GPT-2
    assert trained_context({}, cfg) == 256  # a Hugging Face dir: pretrained elsewhere, on its whole table
    assert trained_context({"trained_context": 4096}, cfg) == 256  # never more than the table
    # training: this run's block, or more when the checkpoint it starts from was trained on longer blocks
    ck = fixtures.save_tiny_checkpoint(tmp_path / "ck", n_positions=128)  # no trained_context: its whole table
    assert trained_context_after(SimpleNamespace(kind="preset", path=None), 64) == 64
    assert trained_context_after(SimpleNamespace(kind="checkpoint", path=ck), 32) == 128
    meta = (ck / "owngpt.json").read_text()
    (ck / "owngpt.json").write_text(meta.replace('"task"', '"trained_context": 48, "task"'))
    assert trained_context_after(SimpleNamespace(kind="checkpoint", path=ck), 32) == 48
    # continued with longer blocks
    assert trained_context_after(SimpleNamespace(kind="checkpoint", path=ck), 100) == 100
