"""generation's contract, written against the classes of mutants that survived in generation (#25): every bound of
`SamplingParams.validate` from both sides, every command-line flag and its default, `unescape` against a
regular-expression oracle, the one-thread rule for small models, what `load_for_generation` gives, the counts each
result reports, and beam search over a batch against each prompt alone (tiny random checkpoint)."""

from __future__ import annotations

import argparse
import itertools
import re

import pytest
import torch

from owngpt.commands.flags import add_sampling_arguments, params_from_args, unescape
from owngpt.errors import ConfigError
from owngpt.generation import SamplingParams, fit_max_new_tokens, use_one_thread_for_small_models

NAN, INF = float("nan"), float("inf")

# (field values, None = accepted | the flag the ConfigError names). Each documented bound from both sides, and the
# values of the wrong type that Python would otherwise compare happily (True == 1, a float where an int is meant).
BOUNDS = [
    (dict(max_new_tokens=1), None),
    (dict(max_new_tokens=0), "--max-new-tokens 0"),
    (dict(max_new_tokens=True), "--max-new-tokens True"),
    (dict(max_new_tokens=5.0), "--max-new-tokens 5.0"),
    (dict(temperature=0), None),
    (dict(temperature=100), None),
    (dict(temperature=100.001), "--temperature 100.001"),
    (dict(temperature=-1e-9), "--temperature -1e-09"),
    (dict(temperature=NAN), "--temperature nan"),
    (dict(temperature=INF), "--temperature inf"),
    (dict(temperature=True), "--temperature True"),
    (dict(temperature="0.5"), "--temperature '0.5'"),
    (dict(top_k=0), None),
    (dict(top_k=-1), "--top-k -1"),
    (dict(top_k=2.0), "--top-k 2.0"),
    (dict(top_p=1.0), None),
    (dict(top_p=1e-6), None),
    (dict(top_p=0.0), "--top-p 0.0"),
    (dict(top_p=1.0001), "--top-p 1.0001"),
    (dict(top_p=NAN), "--top-p nan"),
    (dict(top_p=True), "--top-p True"),
    (dict(repetition_penalty=1e-6), None),
    (dict(repetition_penalty=0.0), "--repetition-penalty 0.0"),
    (dict(repetition_penalty=-1.0), "--repetition-penalty -1.0"),
    (dict(repetition_penalty=INF), "--repetition-penalty inf"),
    (dict(repetition_penalty=False), "--repetition-penalty False"),
    (dict(no_repeat_ngram_size=0), None),
    (dict(no_repeat_ngram_size=3), None),
    (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram-size -1"),
    (dict(no_repeat_ngram_size=1.5), "--no-repeat-ngram-size 1.5"),
    (dict(num_beams=1), None),
    (dict(num_beams=64), None),
    (dict(num_beams=0), "--num-beams 0"),
    (dict(num_beams=65), "--num-beams 65"),
    (dict(num_beams=True), "--num-beams True"),
    (dict(num_return_sequences=1), None),
    (dict(num_return_sequences=256, temperature=1.0), None),
    (dict(num_return_sequences=0), "--num-samples 0"),
    (dict(num_return_sequences=257, temperature=1.0), "--num-samples 257"),
    (dict(num_return_sequences=2.0, temperature=1.0), "--num-samples 2.0"),
    (dict(num_beams=4, num_return_sequences=4), None),
    (dict(num_beams=4, num_return_sequences=5), "--num-samples 5"),
    (dict(num_beams=1, temperature=0, num_return_sequences=2), "--num-samples 2"),
    (dict(num_beams=2, temperature=0, num_return_sequences=2), None),
    (dict(stop=["x", "\n"]), None),
    (dict(stop=[]), None),
    (dict(stop=["x", ""]), "--stop ['x', '']"),
    (dict(stop="x"), "--stop 'x'"),
    (dict(stop=[3]), "--stop [3]"),
    (dict(seed=None), None),
    (dict(seed=0), None),
    (dict(seed=2**63 - 1), None),
    (dict(seed=2**63), "--seed 9223372036854775808"),
    (dict(seed=-1), "--seed -1"),
    (dict(seed=True), "--seed True"),
    (dict(seed=1.0), "--seed 1.0"),
]


@pytest.mark.parametrize("values,refused", BOUNDS, ids=[repr(v) for v, _ in BOUNDS])
def test_each_sampling_setting_is_accepted_up_to_its_bound_and_refused_past_it(values, refused):
    p = SamplingParams(**values)
    if refused is None:
        assert p.validate() is p
    else:
        with pytest.raises(ConfigError) as e:
            p.validate()
        assert str(e.value).startswith(refused + ": must be "), str(e.value)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_search_must_fit_its_length_in_the_context(num_beams):
    # beam search does not slide its window: max_new_tokens < context; sampling and greedy accept any length
    SamplingParams(max_new_tokens=127, num_beams=num_beams, temperature=0).validate(context_length=128)
    p = SamplingParams(max_new_tokens=128, num_beams=num_beams, temperature=0)
    if num_beams == 1:
        p.validate(context_length=128)
        SamplingParams(max_new_tokens=10_000).validate(context_length=128)
    else:
        with pytest.raises(
            ConfigError, match=r"^--max-new-tokens 128: must be smaller than the model's context of 128"
        ):
            p.validate(context_length=128)
    p.validate()  # no context known: nothing to check against


# --- the command-line flags -------------------------------------------------------------------------------------


def _parse(argv, defaults=None, **kw):
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, defaults)
    return params_from_args(parser.parse_args(argv), **kw)


def test_every_flag_sets_its_field():
    argv = [
        "--max-new-tokens", "7", "--temperature", "0.25", "--top-k", "3", "--top-p", "0.5",
        "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2", "--num-beams", "4",
        "--stop", "a\\nb", "--stop", "END", "--seed", "11",
    ]  # fmt: skip
    want = SamplingParams(
        max_new_tokens=7, temperature=0.25, top_k=3, top_p=0.5, repetition_penalty=1.3, no_repeat_ngram_size=2,
        num_beams=4, stop=["a\nb", "END"], seed=11,
    )  # fmt: skip
    assert _parse(argv) == want
    # each flag alone changes its own field only
    base = _parse([])
    for flag, value, field, parsed in [
        ("--temperature", "0", "temperature", 0.0),
        ("--top-k", "0", "top_k", 0),
        ("--top-p", "0.9", "top_p", 0.9),
        ("--repetition-penalty", "2", "repetition_penalty", 2.0),
        ("--no-repeat-ngram-size", "3", "no_repeat_ngram_size", 3),
        ("--num-beams", "2", "num_beams", 2),
        ("--stop", "\\t", "stop", ["\t"]),
        ("--seed", "0", "seed", 0),
    ]:
        got = _parse([flag, value])
        assert got == SamplingParams(**{**base.to_dict(), field: parsed}), flag


def test_flags_default_to_the_defaults_given_and_the_length_fits_the_context():
    d = SamplingParams(temperature=0.3, top_k=7, top_p=0.8, repetition_penalty=1.1, no_repeat_ngram_size=4, seed=5)
    got = _parse([], d, default_max_new_tokens=99)
    assert got == SamplingParams(**{**d.to_dict(), "max_new_tokens": 99})
    # without --max-new-tokens: the default, or half the context if that is smaller; the flag wins over both
    assert _parse([], context=128).max_new_tokens == 64
    assert _parse([], context=1000).max_new_tokens == 200
    assert _parse([], context=128, default_max_new_tokens=30).max_new_tokens == 30
    assert _parse(["--max-new-tokens", "300"], context=128).max_new_tokens == 300
    # the parsed settings are validated against the context: beam search past it is refused
    with pytest.raises(ConfigError, match="--max-new-tokens 128"):
        _parse(["--max-new-tokens", "128", "--num-beams", "2"], context=128)
    # overrides are passed through (a chat passes its own stop strings)
    assert _parse([], num_return_sequences=3).num_return_sequences == 3


@pytest.mark.parametrize("default,context", [(200, None), (200, 128), (200, 400), (200, 401), (5, 3), (5, 1), (1, 0)])
def test_fit_max_new_tokens_by_hand(default, context):
    want = default if context is None else max(1, min(default, context // 2))
    assert fit_max_new_tokens(default, context) == want >= 1


def test_every_sampling_flag_says_its_default_in_the_help():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    text = " ".join(parser.format_help().split())
    for flag in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                 "--no-repeat-ngram-size", "--num-beams", "--stop", "--seed"):  # fmt: skip
        assert flag in text
    d = SamplingParams()
    for shown in (f"default {d.max_new_tokens}", f"default {d.temperature}", f"default {d.top_k}"):
        assert shown in text


# --- unescape: against a regular expression ----------------------------------------------------------------------


def _unescape_oracle(text: str) -> str:
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
    return re.sub(r"\\([ntr\\0])", lambda m: table[m.group(1)], text)


def test_unescape_equals_a_regular_expression_on_every_short_string():
    # every string of up to 5 characters over backslash, the escape letters and two others
    alphabet = ["\\", "n", "t", "r", "0", "x", "床"]
    n = 0
    for k in range(6):
        for chars in itertools.product(alphabet, repeat=k):
            s = "".join(chars)
            assert unescape(s) == _unescape_oracle(s), repr(s)
            n += 1
    assert n == sum(7**k for k in range(6))


# --- one thread for small models --------------------------------------------------------------------------------


@pytest.fixture
def threads(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_a_small_model_decodes_on_one_thread_unless_omp_num_threads_says_otherwise(threads, monkeypatch):
    model = torch.nn.Linear(10, 10)  # 110 parameters
    assert use_one_thread_for_small_models(model, max_params=111) is True
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert use_one_thread_for_small_models(model, max_params=110) is False  # at the bound: big enough for threads
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert use_one_thread_for_small_models(model, max_params=10**9) is False
    assert torch.get_num_threads() == 2


# --- loading, results, beam search over a batch ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    from owngpt.generation import load_for_generation

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds overhead
    yield load_for_generation(str(tiny_ckpt))
    torch.set_num_threads(n)


def test_a_model_loaded_for_generation_is_in_eval_mode_on_the_device_asked_for(tiny_ckpt, lm):
    from owngpt.generation import load_for_generation

    # dropout off: the same prompt, the same greedy text. (pack_for_decode's PackedLinear modules are made after
    # eval() and say training=True, which they never read: only the model and its dropout layers are checked.)
    dropouts = [m for m in lm.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not lm.model.training and not any(m.training for m in dropouts)
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    elsewhere = load_for_generation(str(tiny_ckpt), device=torch.device("meta"))  # stands for any other device
    assert {p.device.type for p in elsewhere.model.parameters()} == {"meta"}
    assert not elsewhere.model.training


def test_each_result_reports_its_prompt_and_completion_tokens(lm):
    from owngpt.generation import context_length, generate_batch

    ctx = context_length(lm.model)
    tok = lm.tokenizer
    prompts = [[], tok.encode("KING"), tok.encode("ROMEO: " * 60)[: ctx + 9]]
    assert len(prompts[2]) == ctx + 9
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, num_return_sequences=2)
    results = generate_batch(lm.model, tok, prompts, p, eos_token_ids=[])
    assert [r.index for r in results] == list(range(6))
    assert [r.prompt_index for r in results] == [0, 0, 1, 1, 2, 2]
    # an empty prompt starts from one end-of-text token; a long one is read through its last `ctx` tokens
    assert [r.prompt_tokens for r in results] == [1, 1, 4, 4, ctx, ctx]
    assert all(r.completion_tokens == len(r.token_ids) == 6 and r.finish_reason == "length" for r in results)
    beams = generate_batch(lm.model, tok, prompts[:2], SamplingParams(max_new_tokens=6, temperature=0, num_beams=2))
    assert [(r.prompt_index, r.prompt_tokens, r.completion_tokens) for r in beams] == [
        (0, 1, len(beams[0].token_ids)),
        (1, 4, len(beams[1].token_ids)),
    ]


def test_beam_search_over_prompts_of_different_lengths_equals_each_prompt_alone(lm):
    # the batch is left-padded: the pads must be masked out, or the shorter prompt's beams change
    from owngpt.generation import generate_batch

    tok = lm.tokenizer
    prompts = [tok.encode("KING RICHARD:"), tok.encode("O"), tok.encode("ROMEO, ROMEO")]
    p = SamplingParams(max_new_tokens=12, temperature=0, num_beams=3, num_return_sequences=2)
    together = generate_batch(lm.model, tok, prompts, p, eos_token_ids=[])
    for i, ids in enumerate(prompts):
        alone = generate_batch(lm.model, tok, [ids], p, eos_token_ids=[])
        assert [r.token_ids for r in together[2 * i : 2 * i + 2]] == [r.token_ids for r in alone], i


class _SetAfter:
    """A cancel flag (threading.Event's is_set) that turns on after it has been asked `n` times."""

    def __init__(self, n: int) -> None:
        self.asked, self.n = 0, n

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.n


def test_a_prompt_cancelled_during_beam_search_keeps_the_beam_it_had(lm):
    # Cancelled after a few steps, a prompt ends "cancelled" with the best beam found so far: the beam search of that
    # many tokens alone (oracle), never generate's padding and never nothing. The other prompt runs to its length.
    from owngpt.generation import generate_batch

    tok = lm.tokenizer
    a, b = tok.encode("KING"), tok.encode("ROMEO:")
    p = SamplingParams(max_new_tokens=20, temperature=0, num_beams=2)
    first, second = generate_batch(lm.model, tok, [a, b], p, stop_flags=[False, _SetAfter(20)], eos_token_ids=[])
    assert second.finish_reason == "cancelled" and 0 < second.completion_tokens < 20
    k = second.completion_tokens
    (short,) = generate_batch(lm.model, tok, [b], p.replace(max_new_tokens=k), eos_token_ids=[])
    assert second.token_ids == short.token_ids and tok.pad_token_id not in second.token_ids
    (alone,) = generate_batch(lm.model, tok, [a], p, eos_token_ids=[])
    assert (first.token_ids, first.finish_reason) == (alone.token_ids, "length")


def test_the_generation_config_takes_every_field_from_the_settings_never_from_the_checkpoint(lm):
    # transformers fills a GenerationConfig's unset fields from the checkpoint's generation_config.json: a Hub model
    # may ship sampling, penalties, no cache. Every field generation_config sets must come from the settings (or
    # transformers' neutral values), whatever the checkpoint saved.
    from owngpt.generation import generation_config

    saved = lm.model.generation_config
    keep = saved.to_dict()
    try:
        for k, v in dict(do_sample=True, temperature=5.0, top_k=3, top_p=0.5, repetition_penalty=2.0,
                         no_repeat_ngram_size=4, use_cache=False, num_beams=5, max_new_tokens=7,
                         early_stopping=False, length_penalty=3.0, bos_token_id=11).items():  # fmt: skip
            setattr(saved, k, v)
        tok = lm.tokenizer
        beam = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=4, top_p=0.9, repetition_penalty=1.2,
                              no_repeat_ngram_size=2, num_beams=3, num_return_sequences=2)  # fmt: skip
        g = generation_config(lm.model, tok, beam, [5, 6])
        assert (g.max_new_tokens, g.num_beams, g.num_return_sequences) == (9, 3, 2)
        assert (g.do_sample, g.temperature, g.top_k, g.top_p) == (True, 0.7, 4, 0.9)
        assert (g.repetition_penalty, g.no_repeat_ngram_size, g.use_cache) == (1.2, 2, True)
        assert (g.early_stopping, g.length_penalty) == (True, 1.0)
        assert g.eos_token_id == [5, 6] and g.pad_token_id == tok.pad_token_id and g.bos_token_id == 11
        greedy = generation_config(lm.model, tok, SamplingParams(max_new_tokens=4, temperature=0), [])
        assert (greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p) == (False, 1.0, 50, 1.0)
        assert greedy.num_beams == 1 and greedy.use_cache is True and greedy.eos_token_id == []
        # without a pad token: the first end token pads, and without either, id 0
        pad = tok.pad_token
        tok.pad_token = None
        try:
            assert generation_config(lm.model, tok, beam, [5, 6]).pad_token_id == 5
            assert generation_config(lm.model, tok, beam, []).pad_token_id == 0
        finally:
            tok.pad_token = pad
    finally:
        for k, v in keep.items():
            if hasattr(saved, k):
                setattr(saved, k, v)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_streamed_pieces_are_never_empty_and_join_to_each_rows_text(lm, num_beams):
    from owngpt.generation import generate_batch

    tok = lm.tokenizer
    pieces: dict[int, list[str]] = {}
    p = SamplingParams(max_new_tokens=15, temperature=0 if num_beams > 1 else 1.0, seed=1, num_beams=num_beams,
                       num_return_sequences=2)  # fmt: skip
    results = generate_batch(lm.model, tok, [tok.encode("KING"), tok.encode("O")], p,
                             streamer_callback=lambda i, s: pieces.setdefault(i, []).append(s),
                             eos_token_ids=[])  # fmt: skip
    assert all(s for ps in pieces.values() for s in ps)
    for r in results:
        assert "".join(pieces.get(r.index, [])) == r.text


def test_the_trained_context_is_used_when_it_is_a_positive_int():
    # context_length: the loader's trained context (any positive int, even 1) wins; anything else falls back to the
    # model's position table
    import fixtures
    from owngpt.generation import context_length

    model = fixtures.tiny_gpt2(fixtures.char_tokenizer(), n_positions=48)
    for trained, want in ((1, 1), (32, 32), (0, 48), (-3, 48), (None, 48), (16.0, 48)):
        model.owngpt_context = trained
        assert context_length(model) == want, trained
