"""Pretrained checkpoints in the layout of Hub repositories, from a local directory: a Chinese GPT-2 with a BERT-style
`vocab.txt` tokenizer (as UER's gpt2-chinese: GPT2LMHeadModel + BertTokenizer, no EOS, out-of-vocabulary bos/eos ids
in config.json) and a small Qwen2-style causal LM with its own BPE tokenizer and chat template. Each is prepared
(`--tokenizer DIR`), fine-tuned (`--model DIR`), generated from and served, offline. Tiny random weights, built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，在的"}],
    [
        {"role": "user", "content": "今天开会吗"},
        {"role": "assistant", "content": "开会，马上到"},
        {"role": "user", "content": "好"},
        {"role": "assistant", "content": "明天见"},
    ],
    [{"role": "user", "content": "周末有空吗"}, {"role": "assistant", "content": "有空，去爬山"}],
    [{"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气，再见"}],
]
CHARS = sorted({c for conv in CHATS for m in conv for c in m["content"]} | set("abcdefghijklmnopqrstuvwxyz0123456789"))


def bert_gpt2_dir(path: Path) -> Path:
    """UER gpt2-chinese's layout: config.json (GPT2, tokenizer_class BertTokenizer, GPT-2's default bos/eos 50256,
    outside the vocabulary), model.safetensors, vocab.txt, tokenizer_config.json, special_tokens_map.json."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64})
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
            }
        )
    )
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2, tokenizer_class="BertTokenizer"
    )  # bos/eos stay 50256, as in UER's config.json
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_dir(path: Path) -> Path:
    """A Qwen2.5-style directory: Qwen2ForCausalLM (GQA, tied embeddings), byte-level BPE tokenizer.json with
    <|endoftext|>/<|im_start|>/<|im_end|>, eos <|im_end|>, and a chat template with a default system prompt."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [m["content"] for conv in CHATS for m in conv] + ["system user assistant You are a helpful assistant."]
    tk.train_from_iterator(
        texts * 5,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


BUILDERS = {"bert-gpt2": bert_gpt2_dir, "qwen2": qwen2_dir}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def finetuned(request, tmp_path_factory):
    """(kind, model dir, data dir, fine-tuned checkpoint): prepare with --tokenizer DIR, train 2 steps --model DIR."""
    from owngpt.config import TrainConfig
    from owngpt.data.prepare import PrepareConfig, prepare
    from owngpt.train import train

    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    model_dir = BUILDERS[kind](tmp / "model")
    src = tmp / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CHATS * 3), "utf-8")
    data = tmp / "data"
    prepare(
        PrepareConfig(
            sources=[str(src)],
            out=str(data),
            task="chat",
            tokenizer=str(model_dir),
            dedup=False,
            quiet=True,
            progress=False,
        )
    )
    result = train(
        TrainConfig(
            task="chat",
            data=str(data),
            model=str(model_dir),
            out=str(tmp / "run"),
            max_steps=2,
            eval_every=2,
            eval_batches=1,
            batch_size=2,
            warmup_steps=1,
            lr=1e-3,
            log_every=1,
        )
    )
    return kind, model_dir, data, result.last_checkpoint


def test_prepared_data_uses_the_models_own_vocabulary(finetuned):
    import numpy as np
    from transformers import AutoTokenizer

    kind, model_dir, data, _ = finetuned
    meta = json.loads((data / "meta.json").read_text())
    original = AutoTokenizer.from_pretrained(model_dir)
    assert meta["tokenizer"]["kind"] == "pretrained" and meta["tokenizer"]["vocab_size"] == len(original)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    ids = np.fromfile(data / "train.ids.bin", dtype=meta["dtype"])
    idx = np.load(data / "train.idx.npy")
    first = tok.convert_ids_to_tokens(ids[idx[0] : idx[1]].tolist())
    if kind == "bert-gpt2":
        # GPT2-chitchat's layout in the model's own tokens: [CLS] user [SEP] assistant [SEP]; [SEP] is the EOS
        assert first == ["[CLS]", "你", "好", "[SEP]", "你", "好", "，", "在", "的", "[SEP]"]
        assert tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"
    else:  # the model's own template, default system prompt included
        text = tok.apply_chat_template(CHATS[0], tokenize=False)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        assert ids[idx[0] : idx[1]].tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_finetuned_checkpoint_says_where_it_came_from(finetuned):
    kind, model_dir, _, ckpt = finetuned
    meta = json.loads((ckpt / "owngpt.json").read_text())
    # relative to the run (tmp/run, the model in tmp/model): a shared checkpoint does not reveal the user's folders
    assert meta["source"]["kind"] == "local" and meta["source"]["path"] == "../model"
    assert meta["source_description"] == "pretrained: local checkpoint ../model"
    assert meta["data"]["path"] == "../data"
    for f in ("owngpt.json", "trainer/state.json"):
        text = (ckpt / f).read_text()
        assert str(model_dir.parent) not in text, (f, text[text.find(str(model_dir.parent)) - 200 :][:400])
    run_config = (ckpt.parent.parent / "config.yaml").read_text(encoding="utf-8")
    assert f"# model: pretrained: local checkpoint {model_dir}\n" in run_config  # a comment: --config still loads
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == {"bert-gpt2": "gpt2", "qwen2": "qwen2"}[kind]


def _oracle_reply(ckpt: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """transformers' own greedy generate on the same weights and template, cut at the first stop token."""
    import torch

    from owngpt.chat_format import stop_token_ids
    from owngpt.checkpoint import load_model
    from owngpt.tokenizer import load_tokenizer

    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    stops = set(stop_token_ids(tok))
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode(new[:cut], skip_special_tokens=True)


def test_chat_and_serve_answer_as_transformers_does(finetuned):
    from fastapi.testclient import TestClient

    import owngpt.api
    from owngpt.serve.app import create_app

    kind, _, _, ckpt = finetuned
    messages = [{"role": "user", "content": "今天开会吗"}]
    expected = _oracle_reply(ckpt, messages, 8)
    model = owngpt.api.load(str(ckpt), temperature=0, max_new_tokens=8)
    # every front end drops the whitespace a reply starts with (one engine, one rule), and only that
    assert "".join(model.chat(messages)) == expected.lstrip()
    with TestClient(create_app(str(ckpt), model_name="x")) as client:
        r = client.post(
            "/v1/chat/completions", json={"model": "x", "messages": messages, "temperature": 0, "max_tokens": 8}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected.lstrip()


def test_plain_generation_from_the_untuned_directory(finetuned):
    """The pretrained directory itself (no owngpt.json) generates; a BERT-style one without an EOS stops at length."""
    import owngpt.api

    kind, model_dir, _, _ = finetuned
    model = owngpt.api.load(str(model_dir), temperature=0, max_new_tokens=5)
    assert isinstance("".join(model.generate("你好")), str)


def test_bert_style_tokenizer_decodes_chinese_without_spaces(tmp_path):
    from owngpt.chat_format import adapt_pretrained_tokenizer
    from owngpt.tokenizer import load_tokenizer

    tok = load_tokenizer(bert_gpt2_dir(tmp_path / "m"))
    ids = tok("你好，在的 hello 今天", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "你好，在的 hello今天"  # WordPiece alone gives "你 好 ， 在 的 hello 今 天"
    assert adapt_pretrained_tokenizer(tok) == "sep" and tok.eos_token == "[SEP]"
    text = tok.apply_chat_template(CHATS[1], tokenize=False)
    assert text == "[CLS]今天开会吗[SEP]开会，马上到[SEP]好[SEP]明天见[SEP]"
