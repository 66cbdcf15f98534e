"""`owngpt chat`: prompt building, the REPL's commands, Ctrl-C, transcripts, and a real pseudo-terminal session."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import pytest

from owngpt import chat as chat_mod
from owngpt.chat import ChatREPL, ChatSettings, is_chat_model, plain_transcript, reply
from owngpt.chat_format import IM_END, prompt_ids
from owngpt.conversation import conversation_prompt
from owngpt.errors import ConfigError
from owngpt.generation import SamplingParams, load_for_generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    return load_for_generation(str(tiny_ckpt))


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Speak, speak."},
    {"role": "user", "content": "And then?"},
]


def test_plain_transcript_and_dropping_oldest_turns(lm):
    assert plain_transcript(CONV) == "Be brief.\nUser: Hello there\nBot: Speak, speak.\nUser: And then?\nBot:"
    tok = lm.tokenizer
    full = conversation_prompt(tok, CONV, chat=False, max_tokens=1000, eos_ids=[0]).ids
    assert tok.decode(full) == plain_transcript(CONV)
    short = conversation_prompt(
        tok, CONV, chat=False, max_tokens=len(full) - 5, eos_ids=[0]
    ).ids  # one turn too many: the oldest goes, the system line stays
    assert tok.decode(short) == "Be brief.\nUser: And then?\nBot:"


def test_chat_model_detection(lm):
    assert not is_chat_model(lm)  # an owngpt `lm` checkpoint: its tokenizer has the template, but it is no chat model
    chat = type(lm)(model=lm.model, tokenizer=lm.tokenizer, path=lm.path, meta={"task": "chat"})
    assert is_chat_model(chat)
    hf_dir = type(lm)(model=lm.model, tokenizer=lm.tokenizer, path=lm.path, meta={})
    assert is_chat_model(hf_dir)  # a plain Hugging Face dir with a chat template


def test_template_mode_prompts_with_the_template_and_stops_at_end_of_turn(lm, monkeypatch):
    seen = {}

    def fake_generate(model, tok, ids, params, streamer_callback=None, stop_flags=None, eos_token_ids=None, **kw):
        seen.update(ids=ids, eos=eos_token_ids, stop=params.stop, **kw)
        from owngpt.generation import GenerationResult

        return [GenerationResult(0, 0, [], "hi", "stop", len(ids[0]), 0)]

    monkeypatch.setattr(chat_mod, "generate_batch", fake_generate)
    params = SamplingParams(max_new_tokens=20)
    r = reply(lm, CONV, params, ChatSettings(use_template=True))
    assert r.text == "hi"
    assert seen["ids"] == [prompt_ids(lm.tokenizer, CONV, max_tokens=128 - 20)]
    assert lm.tokenizer.convert_tokens_to_ids(IM_END) in seen["eos"]
    assert seen["stop"] == [] and seen["slide"] is False and seen["lstrip"] is True
    reply(lm, CONV, params, ChatSettings(use_template=False))
    assert seen["stop"] == ["\nUser:", "\n\n"] and seen["eos"] == [lm.tokenizer.eos_token_id]


def test_reply_streams_what_it_returns(lm):
    pieces = []
    r = reply(
        lm, CONV, SamplingParams(max_new_tokens=30, seed=1), ChatSettings(use_template=True), on_text=pieces.append
    )
    assert "".join(pieces) == r.text and r.text == r.text.lstrip()


def repl(lm, lines, tmp_path=None, **kw):
    out = io.StringIO()
    params = SamplingParams(max_new_tokens=12, seed=0)
    r = ChatREPL(lm, params, ChatSettings(use_template=False), out=out, err=out, **kw)
    r.run(stdin=io.StringIO("".join(line + "\n" for line in lines)))
    return r, out.getvalue()


def test_repl_commands_and_transcript(lm, tmp_path):
    t = tmp_path / "t.json"
    r, out = repl(
        lm,
        [
            "Hello there",
            "/params",
            "/set temperature 0.5",
            "/set top_p 2",
            "And then?",
            "/reset",
            "Again",
            f"/save {tmp_path / 's.json'}",
            "/bogus",
            "/help",
            "/exit",
            "never read",
        ],
        transcript=str(t),
        system="Be brief.",
    )
    assert "temperature = 0.5" in out and "error: --top-p 2.0" in out
    assert "(conversation reset)" in out and "unknown command /bogus" in out and "/save FILE" in out
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert saved["messages"][1]["content"] == "Again"
    assert json.loads(t.read_text(encoding="utf-8"))["messages"] == saved["messages"]
    assert r.params.temperature == 0.5


def test_repl_ends_at_end_of_input(lm):
    r, _ = repl(lm, ["Hello"])
    assert [m["role"] for m in r.messages] == ["user", "assistant"]


def test_ctrl_c_stops_the_answer_not_the_session(lm):
    out = io.StringIO()
    sent = []

    class Out(io.StringIO):
        def write(self, s):
            if s and not sent and not s.startswith("("):  # the first piece of the answer: press Ctrl-C
                sent.append(s)
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(s)

    out = Out()
    params = SamplingParams(max_new_tokens=60, temperature=1.0, top_k=0, seed=0)
    r = ChatREPL(lm, params, ChatSettings(use_template=True), out=out, err=out)
    before = signal.getsignal(signal.SIGINT)
    rep = r.turn("Hello")
    assert rep.finish_reason == "cancelled" and "(stopped)" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored after the answer
    r.turn("Still there?")  # the session goes on
    assert [m["role"] for m in r.messages] == ["user", "assistant", "user", "assistant"]


def test_mmi_needs_sampling(lm):
    with pytest.raises(ConfigError, match="--temperature"):
        reply(lm, CONV, SamplingParams(temperature=0, max_new_tokens=10), ChatSettings(use_template=True, mmi=lm))


def test_chat_in_a_real_terminal(tiny_ckpt, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    t = tmp_path / "transcript.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    c = pexpect.spawn(
        sys.executable,
        ["-m", "owngpt", "chat", str(tiny_ckpt), "--max-new-tokens", "8", "--transcript", str(t), "--seed", "1"],
        encoding="utf-8",
        timeout=120,
        env=env,
    )
    try:
        c.expect_exact("you> ")
        c.sendline("Hello there")
        c.expect_exact("bot> ")
        c.expect_exact("you> ")
        c.sendline("And then?")
        c.expect_exact("you> ")
        c.sendline("/reset")
        c.expect_exact("(conversation reset)")
        c.sendline("Again")
        c.expect_exact("you> ")
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    assert "Traceback" not in (c.before or "")
    msgs = json.loads(t.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["Again"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]


def test_save_never_replaces_a_users_file_or_the_checkpoint(lm, tmp_path):
    """/save into a folder crashed the REPL with IsADirectoryError (the whole conversation lost), and /save onto the
    checkpoint's config.json or any user file silently replaced it. Now each is refused and the session goes on."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    config = lm.path / "config.json"
    before = config.read_bytes()
    folder = tmp_path / "folder"
    folder.mkdir()
    r, out = repl(lm, ["Hello", f"/save {folder}", f"/save {config}", f"/save {notes}", "Still here?"])
    assert f"error: {folder} is a folder" in out
    assert "lies inside the checkpoint" in out and "is not a chat transcript owngpt wrote" in out
    assert config.read_bytes() == before and notes.read_text(encoding="utf-8") == "my notes\n"
    assert list(folder.iterdir()) == []
    assert [m["role"] for m in r.messages] == ["user", "assistant", "user", "assistant"]
    saved = tmp_path / "talk.json"
    repl(lm, ["Hello", f"/save {saved}"])
    repl(lm, ["Bye", f"/save {saved}"])  # an earlier transcript is replaced, as documented
    assert json.loads(saved.read_text(encoding="utf-8"))["messages"][0]["content"] == "Bye"


def test_transcript_flag_refuses_a_users_file_before_the_first_answer(lm, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"messages": []}\n', encoding="utf-8")  # a user's data file, not a transcript owngpt wrote
    with pytest.raises(ConfigError, match="not a chat transcript"):
        repl(lm, ["Hello"], transcript=str(notes))
    assert notes.read_text(encoding="utf-8") == '{"messages": []}\n'


def test_context_note_only_when_the_reply_reached_the_context(lm):
    """The REPL said "(the reply reached the model's context ...)" when a reply had used its max_new_tokens but
    its stripped text re-tokenized shorter; it counts the generated tokens now."""
    out = io.StringIO()
    r = ChatREPL(lm, SamplingParams(max_new_tokens=5, seed=0), ChatSettings(use_template=False), out=out, err=out)
    for text in ["Hello", "and you?", "  ", "What now"]:
        rep = r.turn(text)
        assert rep.completion_tokens == 5 or rep.finish_reason == "stop"
    assert "reached the model's context" not in out.getvalue()


def test_chat_command_refuses_a_users_transcript_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from owngpt import generation
    from owngpt.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --transcript check")

    monkeypatch.setattr(generation, "load_for_generation", no_load)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n", encoding="utf-8")
    assert main(["chat", str(tmp_path / "no-such-ckpt"), "--transcript", str(notes)]) == 2
    assert "is not a chat transcript owngpt wrote" in capsys.readouterr().err
    assert notes.read_text(encoding="utf-8") == "mine\n"
