"""Tests written to kill mutants of owngpt.tasks.* that tools/mutate.py found surviving (docs/testing.md lists them).

Oracles: the number of conversations written into the data dir, the files present, the tokenizer's own ids."""

from __future__ import annotations

import json

import pytest
from train_helpers import write_chat_data_dir

from owngpt.config import TrainConfig
from owngpt.data.datadir import open_data_dir
from owngpt.errors import DataError
from owngpt.tasks.base import get_task


def _chat(path, n_train: int, n_val: int, **cfg):
    data = open_data_dir(write_chat_data_dir(path, n_train, n_val))
    return get_task("chat")(data, data.load_tokenizer(), TrainConfig(task="chat", **cfg), block_size=64)


@pytest.mark.parametrize("n_train,n_val", [(1, 0), (1, 1), (3, 2)])
def test_chat_examples_are_the_conversations_written(tmp_path, n_train, n_val):
    # kills tasks/chat num_train_examples `n == 0` -> `n == 1`, has_val `> 0` -> `>= 0` / `> 1`, and num_examples
    # counting the mask instead of the offsets
    task = _chat(tmp_path / "chat", n_train, n_val)
    assert task.num_examples("train") == task.num_train_examples() == n_train
    assert task.num_examples("val") == n_val
    assert task.has_val() == (n_val > 0)


def test_a_chat_dir_without_train_conversations_is_refused(tmp_path):
    task = _chat(tmp_path / "chat", 0, 1)
    with pytest.raises(DataError, match="train split has no examples for task 'chat'"):
        task.num_train_examples()


def test_a_chat_split_without_its_index_file_has_no_examples(tmp_path):
    # kills tasks/chat _split's empty offsets `np.zeros(1)` -> `np.zeros(2)` (a phantom example)
    path = write_chat_data_dir(tmp_path / "chat", 2, 1)
    for f in ("val.idx.npy", "val.ids.bin", "val.mask.bin"):
        (path / f).unlink()
    data = open_data_dir(path)
    task = get_task("chat")(data, data.load_tokenizer(), TrainConfig(task="chat"), block_size=64)
    assert task.num_examples("val") == 0 and not task.has_val()
    assert task.num_train_examples() == 2


def test_a_chat_row_holds_block_size_plus_one_tokens_whole_and_longer_ones_are_cut(tmp_path):
    # kills tasks/chat render_example's `limit = block_size + 1` -> `block_size - 1` / `block_size + 2`
    from owngpt.chat_format import render

    path = write_chat_data_dir(tmp_path / "chat", 3, 1)
    data = open_data_dir(path)
    tok = data.load_tokenizer()
    convs = [json.loads(line)["messages"] for line in open(path / "train.jsonl", encoding="utf-8")]
    for i, conv in enumerate(convs):
        full, _ = render(tok, conv)
        n = len(full)
        # inputs are ids[:-1] and labels ids[1:]: n tokens make a row of n - 1 inputs, which fits block_size n - 1
        whole = get_task("chat")(data, tok, TrainConfig(task="chat"), block_size=n - 1)
        ids, _ = whole.example("train", i)
        assert ids.tolist() == list(full)
        assert whole.collate([i])["input_ids"].shape[1] == n - 1
        # one token less room: the conversation is cut (its oldest turns dropped) to fit
        cut = get_task("chat")(data, tok, TrainConfig(task="chat"), block_size=n - 2)
        ids, _ = cut.example("train", i)
        assert len(ids) <= n - 1 and ids.tolist() == list(render(tok, conv, max_tokens=n - 1)[0])


def test_a_chat_row_that_fits_is_read_from_the_stored_rendering(tmp_path):
    # prepare stores every conversation rendered; rows that fit come from there, the jsonl is read only for the rare
    # longer ones (module docstring). Kills tasks/chat `mask is not None` -> `is None` (every row rendered again),
    # `b - a` -> `b + a` and `<= limit` -> `< limit` (rows that fit, the longest exactly, rendered again)
    import numpy as np

    path = write_chat_data_dir(tmp_path / "chat", 3, 1)
    offsets = np.load(path / "train.idx.npy")
    longest = int(np.diff(offsets).max())
    data = open_data_dir(path)
    tok = data.load_tokenizer()
    before = get_task("chat")(data, tok, TrainConfig(task="chat"), block_size=longest - 1).collate([0, 1, 2])
    (path / "train.jsonl").unlink()
    fresh = get_task("chat")(data, tok, TrainConfig(task="chat"), block_size=longest - 1)
    after = fresh.collate([0, 1, 2])
    assert all(before[k].equal(after[k]) for k in before)
    assert after["input_ids"].shape[1] == longest - 1


def test_a_chat_tokenizer_without_a_pad_token_pads_with_end_of_text(tmp_path):
    # kills tasks/chat collate's `pad is None` -> `is not None` (no pad token: int(None))
    data = open_data_dir(write_chat_data_dir(tmp_path / "chat", 2, 1))
    tok = data.load_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    batch = get_task("chat")(data, tok, TrainConfig(task="chat"), block_size=1000).collate([0, 1])
    padding = batch["attention_mask"] == 0
    assert padding.any()  # the two conversations differ in length
    assert (batch["input_ids"][padding] == tok.eos_token_id).all() and (batch["labels"][padding] == -100).all()


# --- tasks/classify ---------------------------------------------------------------------------------------------


def test_eos_readout_appends_end_of_text_once_with_or_without_a_post_processor():
    # kills tasks/classify add_eos_readout's `old is None` -> `is not None` (no post-processor: a Sequence of None)
    import fixtures
    from owngpt.tasks.classify import add_eos_readout

    for drop_post_processor in (False, True):
        tok = fixtures.char_tokenizer()
        if drop_post_processor:
            tok.backend_tokenizer.post_processor = None
        plain = tok("ab c", add_special_tokens=False)["input_ids"]
        assert add_eos_readout(tok)
        assert tok("ab c")["input_ids"] == plain + [tok.eos_token_id]


def test_eos_readout_leaves_a_tokenizer_that_adds_its_own_special_tokens_alone():
    # kills tasks/classify add_eos_readout's probe `add_special_tokens=False` -> True (the probe compares a call with
    # the tokenizer's specials to one without): a tokenizer adding a start token must not get an EOS readout too
    from tokenizers import processors

    import fixtures
    from owngpt.chat_format import PAD
    from owngpt.tasks.classify import add_eos_readout

    tok = fixtures.char_tokenizer()
    start = tok.convert_tokens_to_ids(PAD)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{PAD} $A", pair=f"{PAD} $A $B", special_tokens=[(PAD, start)]
    )
    before = tok("ab c")["input_ids"]
    assert before[0] == start
    assert not add_eos_readout(tok)
    assert tok("ab c")["input_ids"] == before


def _classify(tmp_path, val, **cfg):
    import fixtures

    train = [("good fun", "pos"), ("bad day", "neg"), ("nice", "pos"), ("awful", "neg"), ("great", "pos")]
    data = open_data_dir(fixtures.write_classify_data_dir(tmp_path / "cls", train, val))
    return get_task("classify")(data, data.load_tokenizer(), TrainConfig(task="classify", **cfg), block_size=32)


def test_a_classify_split_with_no_examples_evaluates_to_nothing(tmp_path):
    # kills tasks/classify _split's empty labels `np.zeros(0)` -> `np.zeros(1)` (an empty split refused)
    import fixtures

    task = _classify(tmp_path, [])
    model = fixtures.tiny_gpt2(task.tokenizer, task="classify")
    assert task.evaluate(model) == {}


def test_predict_split_reads_max_batches_times_batch_size_examples(tmp_path):
    # kills tasks/classify predict_split's `max_batches <= 0` -> `<= 1` (one batch read as "all")
    import fixtures

    val = [("good", "pos"), ("bad", "neg"), ("fine", "pos"), ("poor", "neg"), ("ok", "pos")]
    task = _classify(tmp_path, val)
    model = fixtures.tiny_gpt2(task.tokenizer, task="classify")
    labels = [task.labels.index(lab) for _, lab in val]
    for max_batches, batch_size, want in ((1, 2, 2), (2, 2, 4), (0, 2, 5), (1, 8, 5)):
        probs, y = task.predict_split(model, "val", max_batches, batch_size)
        assert probs.shape == (want, 2) and y.tolist() == labels[:want]


def test_classify_rows_number_each_draw_by_its_position_in_the_stream(tmp_path):
    # The draw number of a training row seeds its augmentation (tasks/classify global_rows): it is the row's position
    # in the endless stream of batches, so no two draws of a run share a seed. Kills `step * n` -> `step / n`.
    task = _classify(tmp_path, [("ok", "pos")], augment=0.5)
    seen = []
    for step in range(6):
        rows = task.global_rows(step, 4)
        assert [draw for _, draw in rows] == list(range(step * 4, step * 4 + 4))
        seen += [i for i, _ in rows]
    assert sorted(set(seen)) == list(range(5))


# --- tasks/base -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_examples,n", [(10, 4), (7, 7), (5, 12), (1, 3)])
def test_epoch_rows_are_an_endless_stream_of_fresh_permutations(n_examples, n):
    # the documented contract of tasks/base epoch_rows: rows step*n .. step*n + n - 1 of one stream of epochs, each
    # epoch every example exactly once; a pure function of its arguments. Oracles: the stream cut at multiples of
    # n_examples, and the same stream read with another batch size.
    from owngpt.tasks.base import epoch_rows

    steps = 12
    stream = [i for step in range(steps) for i in epoch_rows(n_examples, 3, step, n)]
    assert len(stream) == steps * n
    epochs = [stream[e * n_examples : (e + 1) * n_examples] for e in range(len(stream) // n_examples)]
    assert all(sorted(ep) == list(range(n_examples)) for ep in epochs)
    if n_examples > 3:
        assert len({tuple(ep) for ep in epochs}) > 1  # each epoch is shuffled afresh
        # another seed, another stream
        assert stream != [i for step in range(steps) for i in epoch_rows(n_examples, 4, step, n)]
    # the stream does not depend on the batch size it is read with
    assert epoch_rows(n_examples, 3, 0, steps * n) == stream
    assert [i for step in range(steps * n) for i in epoch_rows(n_examples, 3, step, 1)] == stream
    assert epoch_rows(n_examples, 3, 5, n) == epoch_rows(n_examples, 3, 5, n)
    with pytest.raises(ValueError, match="no training examples"):
        epoch_rows(0, 3, 0, n)


def test_rng_for_depends_on_every_key_and_only_on_the_low_32_bits():
    from owngpt.tasks.base import rng_for

    def draw(*a):
        return rng_for(*a).integers(0, 2**62, 4).tolist()

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({tuple(draw(*a)) for a in [(1, 2, 3), (2, 2, 3), (1, 3, 3), (1, 2, 4), (1, 2)]}) == 5
    assert draw(1 + 2**32, 2) == draw(1, 2)  # seeds are taken modulo 2**32 (numpy needs non-negative words)
    assert draw(-1, 2) == draw(2**32 - 1, 2)


@pytest.mark.parametrize(
    "epochs,n_examples,batch,want", [(1, 5, 2, 3), (2, 5, 2, 5), (0.1, 5, 2, 1), (1, 8, 4, 2), (3, 10, 4, 8)]
)
def test_steps_for_epochs_by_hand(tmp_path, epochs, n_examples, batch, want):
    # ceil(epochs * examples / global batch), at least one step
    task = _chat(tmp_path / "chat", n_examples, 1)
    assert task.steps_for_epochs(epochs, batch) == want


def test_chat_batch_units_are_the_trained_tokens(tmp_path):
    # the loss is a sum over trained tokens, normalised by batch_units: the assistant tokens of the rendered
    # conversations, counted from the mask chat_format.render gives (labels are shifted by one)
    from owngpt.chat_format import render

    path = write_chat_data_dir(tmp_path / "chat", 3, 1)
    task = _chat(tmp_path / "chat2", 3, 1)
    tok = task.tokenizer
    convs = [json.loads(line)["messages"] for line in open(path / "train.jsonl", encoding="utf-8")]
    want = sum(sum(render(tok, c, max_tokens=65)[1][1:]) for c in convs)
    assert task.batch_units(task.collate([0, 1, 2])) == want > 0


def test_pad_examples_written_out():
    # tasks/base pad_examples by hand: right-padded inputs, labels shifted by one where the mask trains the next
    # token, -100 elsewhere; a one-token example still attends to one position
    from owngpt.tasks.base import pad_examples

    P = 99
    batch = pad_examples([([5, 6], [1, 1]), ([1, 2, 3, 4], [0, 1, 0, 1]), ([7], [1])], P)
    assert batch["input_ids"].tolist() == [[5, P, P], [1, 2, 3], [P, P, P]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, -100, -100], [2, -100, 4], [-100, -100, -100]]
    assert pad_examples([([3], [1])], P)["input_ids"].shape == (1, 1)


def test_chat_loss_is_the_cross_entropy_of_the_trained_tokens(tmp_path):
    # oracle: torch's cross-entropy computed here on the assistant tokens only (positions picked from render's mask,
    # not from the task's labels). Kills CausalLMTask.loss's ignore_index -100 -> -101.
    import torch

    import fixtures
    from owngpt.chat_format import render

    path = write_chat_data_dir(tmp_path / "chat", 2, 1)
    task = _chat(tmp_path / "chat2", 2, 1)
    tok = task.tokenizer
    model = fixtures.tiny_gpt2(tok)
    convs = [json.loads(line)["messages"] for line in open(path / "train.jsonl", encoding="utf-8")]
    want = 0.0
    with torch.no_grad():
        got = float(task.loss(model, task.collate([0, 1])))
        for conv in convs:
            ids, mask = render(tok, conv, max_tokens=65)
            logits = model(torch.tensor([ids[:-1]])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            want -= sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1])
    assert got == pytest.approx(want, rel=1e-5)


def test_lm_generation_ends_at_the_tokenizers_end_of_text(tmp_path):
    # kills tasks/base generation_eos_ids' `eos is None` -> `is not None`
    import fixtures

    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    tok = data.load_tokenizer()
    assert get_task("lm")(data, tok, TrainConfig(task="lm"), 16).generation_eos_ids() == [tok.eos_token_id]


def test_an_evaluation_batch_is_eight_rows_by_default(tmp_path):
    # evaluate's default batch_size is 8: with max_batches=1 it reads 8 windows
    import fixtures

    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    task = get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm"), 4)
    model = fixtures.tiny_gpt2(task.tokenizer)
    assert len(task.eval_rows("val", 0)) > 9
    assert task.evaluate(model, max_batches=1)["val_tokens"] == 8 * 4


# --- fresh sample (seed 1) of tasks/classify --------------------------------------------------------------------


def test_an_empty_text_is_read_from_one_end_of_text_token():
    # encode_texts: an empty text becomes one EOS (the head needs a position). Kills `eos is not None` -> `is None`
    import fixtures
    from owngpt.tasks.classify import encode_texts

    tok = fixtures.char_tokenizer()
    assert tok.eos_token_id != tok.pad_token_id
    assert encode_texts(tok, ["", "ab"], 8) == [[tok.eos_token_id], tok("ab", add_special_tokens=False)["input_ids"]]


def test_freeze_body_freezes_everything_but_the_head(tmp_path):
    # kills ClassifyTask.prepare_model's `freeze_body(model)` dropped
    import fixtures

    task = _classify(tmp_path, [("ok", "pos")], freeze_body=True)
    model = fixtures.tiny_gpt2(task.tokenizer, task="classify")
    task.prepare_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("score.") for n in trainable)


# --- fresh sample (seed 1) of tasks/base --------------------------------------------------------------------------


def test_an_evaluation_without_a_batch_limit_reads_every_row(tmp_path):
    # evaluate() defaults to max_batches=0: every evaluation row of the split, each block_size tokens
    # (oracle: eval_rows' own count). Kills the default 0 -> 1 (one batch read as the whole split).
    import fixtures

    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    task = get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm"), 4)
    model = fixtures.tiny_gpt2(task.tokenizer)
    n_rows = len(task.eval_rows("val", 0))
    assert n_rows > 8
    every = task.evaluate(model)
    assert every["val_tokens"] == n_rows * 4
    assert every["val_loss"] != task.evaluate(model, max_batches=1)["val_loss"]
