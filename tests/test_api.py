"""The Python API (`owngpt.load`): the documented example runs; results equal the engine's; streaming works."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import owngpt
from owngpt.generation import SamplingParams, encode_prompt, generate_batch

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = "runs/shakespeare/checkpoints/last"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def m(tiny_ckpt):
    return owngpt.load(str(tiny_ckpt))


def api_examples() -> list[tuple[str, str]]:
    """The python blocks between <!-- api-example --> markers in docs/generate.md and README.md."""
    out = []
    for name in ("docs/generate.md", "README.md"):
        f = ROOT / name
        if not f.exists():
            continue
        text = f.read_text(encoding="utf-8")
        for block in re.findall(r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text, re.S):
            out.append((name, block))
    return out


def test_the_documented_example_runs(tiny_ckpt, capsys):
    examples = api_examples()
    assert examples, "docs/generate.md has no <!-- api-example --> block"
    for name, code in examples:
        assert DOC_PATH in code, f"{name}: the example should load {DOC_PATH}"
        exec(compile(code.replace(DOC_PATH, str(tiny_ckpt)), name, "exec"), {})
        out = capsys.readouterr().out
        assert out.count("\n") >= 3


def test_generate_equals_the_engine(m):
    ids = encode_prompt(m.tokenizer, "ROMEO:")
    (ref,) = generate_batch(m.model, m.tokenizer, [ids], SamplingParams(max_new_tokens=20, temperature=0))
    assert m.generate("ROMEO:", max_new_tokens=20, temperature=0) == ref.text
    texts = m.generate(["ROMEO:", "KING"], max_new_tokens=20, temperature=0)
    assert isinstance(texts, list) and texts[0] == ref.text
    assert len(m.generate("KING", max_new_tokens=5, num_return_sequences=3, seed=1)) == 3


def test_stream_concatenates_to_the_text(m):
    kw = dict(max_new_tokens=30, seed=2, temperature=1.0)
    pieces = list(m.generate("KING", stream=True, **kw))
    assert len(pieces) > 1 and "".join(pieces) == m.generate("KING", **kw)
    msgs = [{"role": "user", "content": "Hello"}]
    assert "".join(m.chat(msgs, stream=True, **kw)).strip() == m.chat(msgs, **kw)


def test_leaving_a_stream_early_stops_generation(m):
    before = threading.active_count()
    it = m.generate("KING", stream=True, max_new_tokens=60, temperature=1.0, seed=1)
    next(it)
    it.close()  # what `break` does
    assert threading.active_count() == before


def test_errors(m):
    with pytest.raises(owngpt.ConfigError, match="--top-p"):
        m.generate("x", top_p=1.5)
    with pytest.raises(owngpt.ConfigError, match="unknown sampling setting"):
        m.generate("x", temprature=0.5)
    with pytest.raises(owngpt.ConfigError, match="stream=True"):
        m.generate(["a", "b"], stream=True)
    with pytest.raises(owngpt.CheckpointError):
        owngpt.load("/nonexistent/checkpoint")


def test_load_defaults_and_repr(tiny_ckpt):
    g = owngpt.load(str(tiny_ckpt), temperature=0, max_new_tokens=10)
    assert g.generate("ROMEO:") == g.generate("ROMEO:")
    assert "tiny" in repr(g) and g.meta["task"] == "lm" and not g.uses_chat_template


def test_any_length_past_the_context_plain_streamed_and_batched(m):
    """The tiny checkpoint reads 128 tokens: 300 new tokens slide the window, in every way the API generates."""
    kw = dict(max_new_tokens=300, temperature=0)
    text = m.generate("ROMEO:", **kw)
    assert len(text) > 128  # more characters than the model can read at once
    assert "".join(m.generate("ROMEO:", stream=True, **kw)) == text
    batch = m.generate(["ROMEO:", "KING"], **kw)
    assert batch[0] == text and len(batch) == 2
    (ref,) = generate_batch(m.model, m.tokenizer, [encode_prompt(m.tokenizer, "ROMEO:")], SamplingParams(**kw))
    assert ref.text == text
