"""EDA-style augmentation: each edit does what it says, at word level (English) or char level (Chinese), seeded."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from owngpt.augment import Augmenter, cjk_ratio, example_rng, is_chinese, units

EN = ["the film is a gripping and beautiful story", "a dull and lifeless mess of a movie", "great acting"]
ZH = ["这部电影非常好看", "剧情拖沓，演员表演很差", "我很喜欢"]


def test_language_detection_by_cjk_ratio():
    assert cjk_ratio("") == 0.0
    assert is_chinese("这部电影非常好看") and is_chinese("这部 film 非常好看很好")
    assert not is_chinese("a film 好") and not is_chinese("great acting")
    assert units("a  good\tfilm") == ["a", "good", "film"]
    assert units("好 看") == ["好", "看"]  # characters, spaces dropped


@pytest.mark.parametrize("text", EN + ZH)
def test_deletion_keeps_an_ordered_subsequence(text):
    aug = Augmenter(EN + ZH, alpha=0.5)
    parts = units(text)
    for seed in range(20):
        out = units(aug(text, random.Random(seed), op="delete"))
        assert 1 <= len(out) <= len(parts)
        it = iter(parts)
        assert all(u in it for u in out)  # a subsequence, order kept


@pytest.mark.parametrize("text", EN + ZH)
def test_swap_is_a_permutation(text):
    aug = Augmenter(EN + ZH, alpha=0.3)
    outs = {aug(text, random.Random(seed), op="swap") for seed in range(20)}
    for out in outs:
        assert Counter(units(out)) == Counter(units(text))
    assert text not in outs or len(outs) > 1  # it does move things


def test_insertion_and_replacement_use_the_corpus_vocabulary():
    aug = Augmenter(EN + ZH, alpha=0.3)
    en_vocab = {w for t in EN for w in t.split()}
    zh_vocab = {c for t in ZH for c in t if "\u4e00" <= c <= "\u9fff"}
    text = EN[0]
    for seed in range(20):
        ins = units(aug(text, random.Random(seed), op="insert"))
        n = max(1, round(0.3 * len(units(text))))
        assert len(ins) == len(units(text)) + n
        assert set(ins) <= en_vocab  # English texts get English words, never Chinese characters
        rep = units(aug(text, random.Random(seed), op="replace"))
        assert len(rep) == len(units(text)) and set(rep) <= en_vocab
        assert sum(a != b for a, b in zip(rep, units(text))) <= n
        zh = aug(ZH[0], random.Random(seed), op="insert")
        assert " " not in zh and len(zh) == len(ZH[0]) + max(1, round(0.3 * len(ZH[0])))
        assert set(zh) <= zh_vocab | set(ZH[0])


def test_seeded_and_deterministic():
    aug = Augmenter(EN + ZH, alpha=0.2)
    a = [aug(t, example_rng(7, 0, i)) for i, t in enumerate(EN * 5 + ZH * 5)]
    b = [aug(t, example_rng(7, 0, i)) for i, t in enumerate(EN * 5 + ZH * 5)]
    c = [aug(t, example_rng(8, 0, i)) for i, t in enumerate(EN * 5 + ZH * 5)]
    assert a == b and a != c
    # the vocabulary does not depend on the order of the corpus
    assert Augmenter(list(reversed(EN + ZH))).words == Augmenter(EN + ZH).words


def test_edge_cases():
    aug = Augmenter(EN, alpha=0.1)
    assert aug("", random.Random(0)) == ""
    assert aug("word", random.Random(0), op="delete") == "word"  # never deletes everything
    with pytest.raises(ValueError):
        Augmenter(EN, alpha=0)
    with pytest.raises(ValueError):
        Augmenter(EN, ops=("shuffle",))
