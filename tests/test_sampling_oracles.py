"""Sampling and stop strings against oracles written here: nucleus (top-p) sets and probabilities computed by hand
from known distributions, and texts generated without a stop string.

The sampler is reached through `sample_tokens` below, the one place that names where the server's per-row sampler
lives (owngpt.engine, the one engine behind every front end); when the engine moves, repoint that function and the tests stay as they are.
"""

from __future__ import annotations

import math

import pytest
import torch

from owngpt.generation import SamplingParams, encode_prompt, generate_batch, load_for_generation


def sample_tokens(probs: list[float], n: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
    """n tokens drawn by the engine's per-row sampler (owngpt.engine.Row.choose, what generate, chat and the server
    all use), one row each, from logits log(probs) (rows seeded seed, seed+1, ...)."""
    from owngpt.engine import Row, RowSettings, _processors

    logits = torch.tensor(probs, dtype=torch.float32).log()  # (V,)
    draws = []
    for i in range(n):
        row = Row([0], RowSettings(max_tokens=1, temperature=temperature, top_p=top_p, seed=seed + i))
        row.ids, row._processors = [0], _processors(row.settings)  # what Row.begin sets, without a tokenizer
        draws.append(row.choose(logits))
    return draws


def nucleus_by_hand(probs: list[float], temperature: float, top_p: float) -> dict[int, float]:
    """The smallest set of most likely tokens whose probability reaches top_p, renormalised (Holtzman et al. 2020)."""
    w = [p ** (1 / temperature) for p in probs]
    q = [x / sum(w) for x in w]
    kept, total = {}, 0.0
    for i in sorted(range(len(q)), key=lambda i: -q[i]):
        kept[i] = q[i]
        total += q[i]
        if total >= top_p:
            break
    return {i: p / total for i, p in kept.items()}


@pytest.mark.parametrize(
    "probs, temperature, top_p, kept",
    [
        ([0.05, 0.5, 0.15, 0.3], 1.0, 0.7, {1, 3}),  # 0.5 < 0.7 <= 0.5 + 0.3
        ([0.05, 0.5, 0.15, 0.3], 1.0, 0.85, {1, 3, 2}),
        ([0.64, 0.25, 0.09, 0.02], 1.0, 0.8, {0, 1}),
        ([0.64, 0.25, 0.09, 0.02], 2.0, 0.8, {0, 1, 2}),  # temperature flattens before the nucleus is cut
        ([0.1, 0.2, 0.3, 0.4], 1.0, 1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_nucleus_with_probabilities_computed_by_hand(probs, temperature, top_p, kept):
    # catches: `cumsum > top_p` (drops the token that reaches top_p), temperature applied after the cut,
    # sampling from the unsorted order
    want = nucleus_by_hand(probs, temperature, top_p)
    assert set(want) == kept  # the hand oracle agrees with the comment above
    n = 3000
    draws = sample_tokens(probs, n, temperature=temperature, top_p=top_p, seed=1000)
    assert set(draws) == kept
    for token, p in want.items():
        freq = draws.count(token) / n
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (token, freq, p)


def test_a_top_token_above_top_p_is_always_chosen_and_greedy_rows_take_the_argmax():
    # catches: an empty nucleus when the top token alone exceeds top_p ("invalid multinomial distribution")
    assert sample_tokens([0.06, 0.9, 0.04], 200, top_p=0.5) == [1] * 200
    assert sample_tokens([0.3, 0.2, 0.5], 20, temperature=0.0, top_p=0.1) == [2] * 20
    # exactly at the boundary: the first of two equal tokens already reaches top_p = 0.5, so only one is kept
    assert len(set(sample_tokens([0.5, 0.5], 200, top_p=0.5))) == 1
    assert set(sample_tokens([0.5, 0.5], 200, top_p=0.51)) == {0, 1}


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch():
    a = sample_tokens([0.25, 0.25, 0.25, 0.25], 8, seed=7)
    b = sample_tokens([0.25, 0.25, 0.25, 0.25], 3, seed=7)
    assert a[:3] == b and len(set(a)) > 1


# --- stop strings: text that ends on the first part of a stop string is released whole -----------------------------


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine
    yield load_for_generation(str(tiny_ckpt))
    torch.set_num_threads(n)


ABSENT = "\u2603"  # a character the char-level test tokenizer cannot produce, so the stop string never completes


def test_generation_ending_on_a_partial_stop_string_keeps_it(lm):
    # catches: the held-back tail (text that could start a stop string) dropped when generation ends there,
    # e.g. "ab" instead of "abx" for stop "xy"
    ids = encode_prompt(lm.tokenizer, "ROMEO:")
    params = dict(max_new_tokens=24, temperature=0)
    (free,) = generate_batch(lm.model, lm.tokenizer, [ids], SamplingParams(**params), eos_token_ids=[])
    text = free.text
    assert len(text) >= 2 and ABSENT not in text
    for stop in (text[-1] + ABSENT, text[-2:] + ABSENT, text[-1] + ABSENT + "x"):
        pieces: list[str] = []
        (res,) = generate_batch(
            lm.model,
            lm.tokenizer,
            [ids],
            SamplingParams(**params, stop=[stop]),
            streamer_callback=lambda row, piece, pieces=pieces: pieces.append(piece),
            eos_token_ids=[],
        )
        assert res.text == text and res.finish_reason == "length", stop
        assert "".join(pieces) == text, stop  # the stream releases the held-back tail too


def test_server_row_ending_on_a_partial_stop_string_keeps_it(tiny_ckpt):
    from owngpt.serve.engine import Row, RowSettings, load

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = load(tiny_ckpt).engine
        tok = engine.tokenizer
        free = Row(tok.encode("ROMEO:"), RowSettings(max_tokens=24, temperature=0))
        engine.run_batch([free])
        text = free.text
        assert len(text) >= 2 and ABSENT not in text
        pieces: list[str] = []
        held = Row(
            tok.encode("ROMEO:"),
            RowSettings(max_tokens=24, temperature=0, stop=(text[-1] + ABSENT,)),
            on_event=lambda row, piece, fin: pieces.append(piece),
        )
        engine.run_batch([held])
        assert held.text == text and "".join(pieces) == text and held.finish_reason == "length"
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize(
    "buf, stops, kept",
    [
        ("abx", ["xy"], 1),  # "x" may become "xy"
        ("abxy", ["xyz"], 2),
        ("ab", ["xy"], 0),
        ("abc", ["abcd", "cz"], 3),  # the longest candidate wins
        ("abc", ["cz", "abcd"], 3),  # whatever the order of the stops
        ("x", ["xy"], 1),  # the whole buffer
        ("xy", ["xy"], 0),  # a whole stop string is not held back (the caller cuts at it)
        ("aab", ["aabb", "ab"], 3),
        ("", ["xy"], 0),
        ("zab", ["abcd"], 2),  # not the longest possible prefix ("abc"), the next one down
    ],
)
def test_held_back_is_the_longest_suffix_that_starts_a_stop_string(buf, stops, kept):
    # an oracle by brute force beside the table: every suffix, every stop string's proper prefixes
    from owngpt.engine import held_back

    brute = max([k for k in range(1, len(buf) + 1) for s in stops if k < len(s) and buf.endswith(s[:k])], default=0)
    assert brute == kept
    assert held_back(buf, stops) == kept
