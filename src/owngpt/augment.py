"""Text augmentation for classification training: EDA-style edits using the corpus's own words.

Opt-in with `augment: P` (the probability that a training example is augmented each time it is drawn). An augmented
example gets one of four edits, after Wei & Zou's EDA (2019), on a fraction `alpha` of its units:
  - delete:  each unit is dropped with probability alpha (never all of them);
  - swap:    n times, two random units change places;
  - insert:  n times, a random word of the training corpus is inserted at a random position;
  - replace: n random units are replaced by random words of the training corpus.
EDA's replacement uses WordNet synonyms; owngpt has no thesaurus for every language a user brings, so it draws from the
corpus's own vocabulary instead (frequent words are drawn more often, as they appear in the corpus).

Units are words (split on whitespace) for English and other space-separated text, and characters for Chinese (any
text whose non-space characters are mostly CJK), since Chinese has no spaces between words.

Why hand-written: the libraries that do this (nlpaug, TextAttack) pull in large dependencies (NLTK data, WordNet) and
have no character-level mode for Chinese; the four edits are a few lines each. Everything is driven by an explicit
`random.Random`, so a (seed, example) pair always gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

OPS = ("delete", "swap", "insert", "replace")


def is_cjk(ch: str) -> bool:
    """True for CJK ideographs (the unified block, extension A and compatibility ideographs)."""
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def cjk_ratio(text: str) -> float:
    """The fraction of non-space characters that are CJK ideographs (0.0 for an empty text)."""
    chars = [c for c in text if not c.isspace()]
    return sum(map(is_cjk, chars)) / len(chars) if chars else 0.0


def is_chinese(text: str, threshold: float = 0.5) -> bool:
    return cjk_ratio(text) >= threshold


def units(text: str) -> list[str]:
    """The units edits work on: characters (spaces dropped) for Chinese, whitespace-separated words otherwise."""
    if is_chinese(text):
        return [c for c in text if not c.isspace()]
    return text.split()


def join(parts: Sequence[str], chinese: bool) -> str:
    return "".join(parts) if chinese else " ".join(parts)


class Augmenter:
    """EDA-style augmentation with the vocabulary of the training texts.

    >>> aug = Augmenter(["a good film", "a bad film"], alpha=0.3)
    >>> aug("a good film", random.Random(0)) == aug("a good film", random.Random(0))
    True
    """

    def __init__(self, texts: Iterable[str], alpha: float = 0.1, ops: Sequence[str] = OPS):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha} must be in (0, 1]")
        unknown = set(ops) - set(OPS)
        if unknown or not ops:
            raise ValueError(f"unknown augmentation ops {sorted(unknown)}; choose from {', '.join(OPS)}")
        self.alpha, self.ops = alpha, tuple(ops)
        # Two vocabularies, as lists with repeats so that a draw follows corpus frequency: words of the
        # space-separated texts and CJK characters of the Chinese ones. Sorted for determinism across runs.
        words: list[str] = []
        chars: list[str] = []
        for t in texts:
            if is_chinese(t):
                chars.extend(c for c in t if is_cjk(c))
            else:
                words.extend(t.split())
        self.words, self.chars = sorted(words), sorted(chars)

    def __call__(self, text: str, rng: random.Random, op: str | None = None) -> str:
        """One edit (`op`, or one of `self.ops` chosen by `rng`) of `text`."""
        chinese = is_chinese(text)
        parts = units(text)
        if not parts:
            return text
        op = op or rng.choice(self.ops)
        vocab = (self.chars if chinese else self.words) or parts  # no corpus vocab: reuse the text's own units
        n = max(1, round(self.alpha * len(parts)))
        if op == "delete":
            out = random_deletion(parts, self.alpha, rng)
        elif op == "swap":
            out = random_swap(parts, n, rng)
        elif op == "insert":
            out = random_insertion(parts, n, vocab, rng)
        elif op == "replace":
            out = random_replacement(parts, n, vocab, rng)
        else:
            raise ValueError(f"unknown augmentation op {op!r}; choose from {', '.join(OPS)}")
        return join(out, chinese)


def random_deletion(parts: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Drop each unit with probability p; keep one random unit if everything would go."""
    if len(parts) == 1:
        return list(parts)
    kept = [u for u in parts if rng.random() >= p]
    return kept or [parts[rng.randrange(len(parts))]]


def random_swap(parts: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, n times (a no-op for a single unit)."""
    out = list(parts)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_insertion(parts: Sequence[str], n: int, vocab: Sequence[str], rng: random.Random) -> list[str]:
    """Insert n words drawn from `vocab` at random positions."""
    out = list(parts)
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), vocab[rng.randrange(len(vocab))])
    return out


def random_replacement(parts: Sequence[str], n: int, vocab: Sequence[str], rng: random.Random) -> list[str]:
    """Replace n distinct random positions with words drawn from `vocab`."""
    out = list(parts)
    for i in rng.sample(range(len(out)), min(n, len(out))):
        out[i] = vocab[rng.randrange(len(vocab))]
    return out


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for one draw of one example: the same (seed, epoch, index) always gives the same edit.

    A string seed is hashed with SHA-512 by `random.Random`, so this is stable across processes (unlike `hash()`).
    """
    return random.Random(f"owngpt-augment:{seed}:{epoch}:{index}")
