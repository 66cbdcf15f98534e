"""Chat rendering time against conversation length: owngpt's render vs the implementation it replaced.

    python bench/bench_chat_render.py [--turns 100 1000 5000] [--repeats 3]

One conversation of N turns (alternating user/assistant, English and Chinese lines from the bundled corpora) is
rendered into token ids and the loss mask with owngpt's byte-level BPE tokenizer and ChatML template, as
`owngpt prepare --task chat` does (no length limit), and, for the sizes where the old code finishes, as training does
(`max_tokens` = 1024: the oldest turns are dropped). The baseline is chat_format.render as of main 0b380db, kept
below verbatim: it rendered each prefix of the conversation (2k+1 renders for k replies), computed the mask with
any() over all reply spans per token and re-rendered after dropping each turn. Both sides give the same ids and
masks (checked here, and in tests/test_chat_render_parity.py). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import _doc  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- the baseline (main 0b380db)


def _old_template_text(tokenizer, messages, add_generation_prompt=False):
    from owngpt.chat_format import render_text

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_text(messages, add_generation_prompt)


def _old_render_exact(tokenizer, messages, train_on_prompt):
    text = _old_template_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_old_template_text(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_old_template_text(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, [1] * len(ids)
    return ids, [int(any(s <= start < e for s, e in spans)) for start, _end in enc["offset_mapping"]]


def old_render(tokenizer, messages, max_tokens=None, train_on_prompt=False):
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids, mask = _old_render_exact(tokenizer, system + turns, train_on_prompt)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids, mask
        if len(turns) > 2:
            turns = turns[1:]
            while turns and turns[0]["role"] == "assistant":
                turns = turns[1:]
            if turns:
                continue
        return ids[-max_tokens:], mask[-max_tokens:]


# ----------------------------------------------------------------------------- the benchmark


def conversation(n_turns: int) -> list[dict[str, str]]:
    data = ROOT / "src" / "owngpt" / "sample_data"
    en = [ln for ln in (data / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    zh = [ln for ln in (data / "tang300.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    msgs = [{"role": "system", "content": "You are a friend. 你是朋友。"}]
    for i in range(n_turns):
        line = en[i % len(en)] if i % 3 else zh[i % len(zh)]
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": line})
    return msgs


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per measurement (median); the old code at the largest size runs once",
    )
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument(
        "--old-limit-turns",
        type=int,
        default=100,
        help="largest size the old code runs with --max-tokens (it is cubic there)",
    )
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    from owngpt.chat_format import CHAT_TEMPLATE, _encode, _own_template, _own_text_and_spans, _span_mask, render
    from owngpt.tokenizer import train_bpe

    corpus = [m["content"] for m in conversation(3000)]
    tok = train_bpe(corpus, vocab_size=2000)
    tok.chat_template = CHAT_TEMPLATE
    rows = []
    for n in args.turns:
        msgs = conversation(n)
        reps_old = 1 if n == max(args.turns) else args.repeats
        new_s, new = timed(lambda msgs=msgs: render(tok, msgs), args.repeats)
        old_s, old = timed(lambda msgs=msgs: old_render(tok, msgs), reps_old)
        assert new == old, f"{n} turns: ids or mask differ"
        row = {"turns": n, "tokens": len(new[0]), "old": old_s, "new": new_s}
        # the parts of the new path, timed apart: owngpt's own (text, spans, mask) and the tokenizers library's
        text, _spans = _own_text_and_spans(_own_template(tok), msgs)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        own = _own_template(tok)
        row["own"] = timed(
            lambda enc=enc, msgs=msgs, own=own: _span_mask(enc["offset_mapping"], _own_text_and_spans(own, msgs)[1]),
            args.repeats,
        )[0]
        row["tokenize"] = timed(
            lambda text=text: tok(text, add_special_tokens=False, return_offsets_mapping=True), args.repeats
        )[0]
        # what render does now: the text cut at its special tokens, the pieces in one encode_batch
        row["segments"], seg = timed(lambda text=text: _encode(tok, text), args.repeats)
        assert seg == (list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]), f"{n} turns: pieces differ"
        new_t, new_ids = timed(lambda msgs=msgs: render(tok, msgs, max_tokens=args.max_tokens), args.repeats)
        row["new_trunc"] = new_t
        if n <= args.old_limit_turns:
            old_t, old_ids = timed(lambda msgs=msgs: old_render(tok, msgs, max_tokens=args.max_tokens), 1)
            assert new_ids == old_ids, f"{n} turns, max_tokens: ids or mask differ"
            row["old_trunc"] = old_t
        rows.append(row)
        print(row, flush=True)

    def fmt(x: float | None) -> str:
        return "not run" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")

    lines = [
        "## Chat rendering: time against conversation length (`bench/bench_chat_render.py`)",
        "",
        f"Command: `python bench/bench_chat_render.py --turns {' '.join(map(str, args.turns))} --repeats {args.repeats}`.",
        "One conversation of N turns (a system prompt, then alternating user/assistant lines from the bundled English "
        "and Chinese corpora) rendered into ids and the loss mask with a byte-level BPE (2,000 tokens) and owngpt's "
        "ChatML template. Baseline: `chat_format.render` as of main 0b380db, kept in the script (it rendered every "
        "prefix of the conversation, tested each token against every reply span, and re-rendered after dropping each "
        "turn). Both give identical ids and masks (asserted in the run). Seconds, median of "
        f"{args.repeats} runs (the baseline at the largest size: one run).",
        "",
        f"| turns | tokens | as `prepare` renders: before s | after s | speed-up | with max_tokens={args.max_tokens} "
        "(training): before s | after s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['turns']:,} | {r['tokens']:,} | {fmt(r['old'])} | {fmt(r['new'])} | {r['old'] / r['new']:.0f}x | "
            f"{fmt(r.get('old_trunc'))} | {fmt(r['new_trunc'])} |"
        )
    sizes = ", ".join(f"{r['turns']:,}" for r in rows)
    per_turn_new = ", ".join(f"{r['new'] / r['turns'] * 1e6:.0f}" for r in rows)
    per_turn_old = ", ".join(f"{r['old'] / r['turns'] * 1e3:.1f}" for r in rows)
    lines += [
        "",
        f"Per turn at {sizes} turns, before: {per_turn_old} ms (it grows with the number of turns: every reply re-renders the "
        f"conversation before it, and every token is tested against every reply); after: {per_turn_new} µs. "
        "owngpt's own work (building the text and spans, the mask: "
        + ", ".join(f"{r['own'] / r['turns'] * 1e6:.1f}" for r in rows)
        + " µs per turn, timed apart) is linear. Encoding the rendered text as one string with the `tokenizers` "
        "library, as render did before (`tokenizer(text)`): "
        + ", ".join(f"{r['tokenize'] / r['turns'] * 1e6:.0f}" for r in rows)
        + " µs per turn; cut at its special tokens (`<|im_start|>`, `<|im_end|>`, which the library splits on "
        "first anyway) into pieces of about 2,000 characters encoded in one `encode_batch`, as render does now, with "
        "the same ids and offsets (asserted in the run): "
        + ", ".join(f"{r['segments'] / r['turns'] * 1e6:.0f}" for r in rows)
        + " µs per turn, timed apart. The max_tokens path grew with the cube of the turns before, which is why the "
        f"baseline is not run there beyond {args.old_limit_turns:,} turns. Foreign chat templates (a model's own) "
        "still take the prefix-rendering path (their text is cut into pieces the same way).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; the CPU was "
        "shared with other work during the run, so absolute times are noisy: read the ratios.",
    ]
    print("\n".join(lines))
    if not args.no_doc:
        _doc.write_section("chat_render", "\n".join(lines))


if __name__ == "__main__":
    main()
