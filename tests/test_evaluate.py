import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixtures
from owngpt.evaluate import distinct_n, evaluate, lm_stream_loss, masked_loss


def test_stream_loss_scores_every_token_but_the_first_once(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    tokens = np.arange(5, 5 + 50) % model.config.vocab_size
    nll, count = lm_stream_loss(model, tokens, block_size=16, batch_size=3, progress=False)
    assert count == len(tokens) - 1
    # oracle: one forward pass over each window, summed by hand
    ref = 0.0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, 16):
            x = torch.tensor(tokens[s : min(s + 16, len(tokens) - 1)])[None]
            y = torch.tensor(tokens[s + 1 : min(s + 16, len(tokens) - 1) + 1])[None]
            ref += torch.nn.functional.cross_entropy(model(x).logits[0], y[0], reduction="sum").item()
    assert nll == pytest.approx(ref, rel=1e-5)


def test_masked_loss_scores_only_the_masked_tokens(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    ids, mask = [3, 9, 12, 40, 41, 42], [0, 0, 0, 1, 1, 0]
    nll, count = masked_loss(model, [(ids, mask), (ids[:4], mask[:4])])
    assert count == 2 + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    one = -(logp[2, 40] + logp[3, 41]).item()
    assert nll == pytest.approx(one + -logp[2, 40].item(), rel=1e-5)


def test_distinct_counts_words_and_cjk_characters():
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["床前明月光", "明月"], 1) == pytest.approx(5 / 7)
    assert distinct_n([], 2) == 0.0


def test_eval_lm_data_dir_and_text_file_agree_on_bits_per_byte(tiny_ckpt, tiny_lm_data, tmp_path):
    m = evaluate(str(tiny_ckpt), str(tiny_lm_data), progress=False)
    assert m["task"] == "lm" and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # random weights over a vocabulary of V tokens: loss near log V
    assert abs(m["loss"] - math.log(len(fixtures.char_tokenizer()))) < 1.0
    assert m["bits_per_byte"] > 0
    f = tmp_path / "t.txt"
    f.write_text(fixtures.TEXT, encoding="utf-8")
    m2 = evaluate(str(tiny_ckpt), str(f), progress=False)
    assert m2["tokens"] == len(fixtures.char_tokenizer()(fixtures.TEXT, add_special_tokens=False)["input_ids"]) - 1


def test_eval_refuses_data_from_another_tokenizer(tiny_ckpt, tmp_path):
    other = fixtures.char_tokenizer("xyz")  # another vocabulary
    d = fixtures.write_lm_data_dir(tmp_path / "d", text="xyz xyz\n\nzyx\n\nyy", tokenizer=other)
    r = subprocess.run(
        [sys.executable, "-m", "owngpt", "eval", str(tiny_ckpt), "--data", str(d)], capture_output=True, text=True
    )
    assert r.returncode != 0 and "another tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_eval_chat_reports_assistant_perplexity_and_distinct(tiny_ckpt, tmp_path):
    d = tmp_path / "chat"
    d.mkdir()
    tok = fixtures.char_tokenizer()
    tok.save_pretrained(d / "tokenizer")
    convs = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "Hello!"}]}
        for i in range(4)
    ]
    (d / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    meta = {
        "format": "owngpt-data",
        "version": 1,
        "task": "chat",
        "dtype": "uint16",
        "splits": {"val": {"examples": 4}},
        "tokenizer": {"kind": "char", "vocab_size": len(tok)},
    }
    (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    m = evaluate(str(tiny_ckpt), str(d), samples=3, max_new_tokens=5, progress=False)
    assert m["task"] == "chat" and m["samples"] == 3
    n_scored = sum(1 for ch in "Hello!") + 2  # reply characters + <|im_end|> + "\n" per conversation
    assert m["assistant_tokens"] == 4 * n_scored
    assert 0 <= m["distinct_1"] <= 1 and 0 <= m["distinct_2"] <= 1
