"""Sequence classification (e.g. sentiment): a GPT-2 body or a local encoder with a classification head.

The model is transformers' `AutoModelForSequenceClassification` (`GPT2ForSequenceClassification` for GPT-2 bodies),
so checkpoints load with transformers alone. GPT-2's head scores the *last non-pad token* of each sequence: it finds
the rightmost token that is not `config.pad_token_id`, which is correct for right and left padding alike, so the pad
token must be set (owngpt tokenizers reserve `<|pad|>`) and must differ from every real token of the input.

Texts are tokenized here, from the data dir's `{split}.jsonl` and with the *model's* tokenizer, by `encode_texts`,
the same function `owngpt predict` uses: training and prediction cannot drift apart, augmented training texts are
re-tokenized, and an encoder brought from elsewhere (BERT, RoBERTa) gets its own tokenizer's [CLS]/[SEP]. For GPT-2
bodies the tokenizer is made to end every text with EOS (`add_eos_readout`), the fixed position the head reads.

What this module adds to the shared loop (`owngpt.train`): class weights (`class_weights: balanced`), augmentation of
training texts (`augment: P`, see `owngpt.augment`), head-only training (`freeze_body`), LoRA with the head saved
in full, and early stopping on `accuracy` or `macro_f1` (higher is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from owngpt.augment import Augmenter, example_rng
from owngpt.errors import ConfigError, DataError
from owngpt.metrics import classification_metrics
from owngpt.tasks.base import Batch, Task, epoch_rows

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from owngpt.config import TrainConfig
    from owngpt.data.datadir import DataDir

METRICS = ("accuracy", "macro_f1", "val_loss")
# Models that derive position ids from input_ids and the pad token themselves (padding-aware already); passing
# position ids computed from the attention mask would shift them by their padding_idx offset.
_SELF_POSITIONED = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart", "ernie_m", "luke"}


# --- tokens -> tensors --------------------------------------------------------------------------------------------
def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's own special tokens ([CLS]/[SEP] for BERT; the EOS readout of
    `add_eos_readout` for owngpt's GPT-2 classifiers), truncated to `max_length`. An empty text becomes one EOS (or pad) token, since the head needs a position to read.
    """
    if not texts:  # transformers' fast tokenizers raise IndexError on an empty batch
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    return [ids if ids else [int(filler)] for ids in enc]


def add_eos_readout(tokenizer: Any) -> bool:
    """Make the tokenizer end every text with EOS, the position GPT-2's head reads; True if it changed anything.

    GPT-1 classified from an extract token appended to the text: the head then reads a position whose input is always
    the same token, instead of whatever word a text happens to end with, which makes from-scratch training converge
    markedly faster; a language model trained by owngpt also saw EOS at the end of every document. The EOS is added by
    the tokenizer's post-processor, which is saved in the checkpoint's tokenizer.json, so transformers users who call
    `tokenizer(texts)` get exactly the ids owngpt trained on. Tokenizers that already add special tokens (BERT's
    [CLS] ... [SEP]) and those whose pad token is EOS are left alone.
    """
    from tokenizers import processors

    eos, eos_id, backend = tokenizer.eos_token, tokenizer.eos_token_id, getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or eos is None or eos_id is None or tokenizer.pad_token_id == eos_id:
        return False
    probe = "a b"
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return False  # it adds special tokens of its own already
    template = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, int(eos_id))]
    )
    old = backend.post_processor
    backend.post_processor = template if old is None else processors.Sequence([old, template])
    return True


def collate_ids(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad sequences to the longest: `input_ids` and `attention_mask` (B, T) int64 tensors."""
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: expected right or left")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def classifier_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, num_labels) logits of a sequence classifier for a right- or left-padded batch.

    Right padding needs nothing: every model's default positions 0..T-1 are right for the real tokens. With left
    padding, GPT-2 (and BERT) would give the first real token position `n_pad` instead of 0, so we pass positions
    counted over real tokens only, which makes a left-padded row's logits equal its unpadded ones.
    """
    kwargs: dict[str, Any] = {}
    left_padded = bool((attention_mask[:, 0] == 0).any())
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if left_padded and model_type not in _SELF_POSITIONED:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits  # no KV cache


# --- model surgery ------------------------------------------------------------------------------------------------
def head_module_names(model: Any) -> list[str]:
    """Top-level modules of a classifier that are not its body (GPT-2: `score`; BERT/RoBERTa: `classifier`)."""
    base = getattr(model, "base_model_prefix", "")
    return sorted({n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] != base})


def freeze_body(model: Any) -> list[str]:
    """Train the head only: every parameter outside `head_module_names` stops requiring gradients.

    Returns the names of the parameters left trainable.
    """
    heads = set(head_module_names(model))
    if not heads:
        raise ConfigError("freeze_body: this model has no separate classification head to train")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in heads)
        if p.requires_grad:
            trainable.append(name)
    return trainable


def balanced_class_weights(label_ids: np.ndarray, num_labels: int) -> np.ndarray:
    """scikit-learn's "balanced" weights, n_samples / (n_classes * count_c); a class absent from training gets 1.

    Written out (one line) so training does not need scikit-learn; tests compare with
    `sklearn.utils.class_weight.compute_class_weight`.
    """
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=num_labels).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_labels, dtype=np.float64)
    weights[present] = len(label_ids) / (present.sum() * counts[present])
    return weights


# --- the task -----------------------------------------------------------------------------------------------------
class ClassifyTask(Task):
    """Sequence classification on a `--task classify` data dir."""

    name = "classify"
    data_tasks = ("classify",)
    model_kind = "sequence_classification"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, data: DataDir, tokenizer: Any, cfg: TrainConfig, block_size: int):
        super().__init__(data, tokenizer, cfg, block_size)
        self.labels = data.labels
        if len(self.labels) < 2:
            raise DataError(
                f"{data.path}/meta.json lists {len(self.labels)} label(s) {self.labels}: a classifier "
                "needs at least two; check the label column of the prepared file"
            )
        metric = cfg.metric or "accuracy"
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r}: for --task classify use one of {', '.join(METRICS)}")
        # Per-run choice: shadows the class attributes that the loop reads through the task instance.
        self.metric, self.greater_is_better = metric, metric != "val_loss"
        if tokenizer.pad_token_id is None:
            # The head finds the last real token by the pad id: without one it cannot handle batches. Reusing EOS
            # is safe because encode_texts never appends EOS to a non-empty text.
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token: a classifier needs a pad token")
        add_eos_readout(tokenizer)  # the loop saves this tokenizer object into every checkpoint
        self._splits: dict[str, tuple[list[str], np.ndarray]] = {}
        self._encoded: dict[str, list[list[int]]] = {}
        texts, y = self._split("train")
        if not texts:
            raise DataError(f"{data.path}: the train split has no examples; run `owngpt prepare --task classify`")
        self.class_weights = None
        if cfg.class_weights not in (None, "none", "balanced"):
            raise ConfigError(f"class_weights={cfg.class_weights!r}: expected balanced (or leave it unset)")
        if cfg.class_weights == "balanced":
            self.class_weights = balanced_class_weights(y, len(self.labels))
        if not 0 <= cfg.augment <= 1:
            raise ConfigError(f"augment={cfg.augment}: the probability of augmenting an example must be in [0, 1]")
        self.augmenter = None
        if cfg.augment > 0:
            self.augmenter = Augmenter(texts)

    # --- data -------------------------------------------------------------------------------------------------
    def _split(self, split: str) -> tuple[list[str], np.ndarray]:
        if split not in self._splits:
            records = list(self.data.records(split))
            y = self.data.label_ids(split) if records else np.zeros(0, dtype=np.int64)
            if len(y) != len(records):
                raise DataError(
                    f"{self.data.path}: {split}.jsonl has {len(records)} examples but {split}.labels.npy "
                    f"has {len(y)} labels; run `owngpt prepare` again"
                )
            self._splits[split] = ([str(r["text"]) for r in records], np.asarray(y, dtype=np.int64))
        return self._splits[split]

    def _ids(self, split: str) -> list[list[int]]:
        if split not in self._encoded:
            self._encoded[split] = encode_texts(self.tokenizer, self._split(split)[0], self.block_size)
        return self._encoded[split]

    def num_train_examples(self) -> int:
        return len(self._split("train")[0])

    def global_rows(self, step: int, n: int) -> list[Any]:
        # (example, draw) pairs: the draw number (position in the endless stream of epochs) seeds augmentation,
        # so an augmented batch is a pure function of (seed, step) like every other batch.
        rows = epoch_rows(self.num_train_examples(), self.cfg.seed, step, n)
        return [(i, step * n + k) for k, i in enumerate(rows)]

    def collate(self, rows: Sequence[Any], split: str = "train") -> Batch:
        import torch

        texts, y = self._split(split)
        idx = [r[0] if isinstance(r, tuple) else int(r) for r in rows]
        if split == "train" and self.augmenter is not None:
            seqs = []
            for r, i in zip(rows, idx):
                draw = r[1] if isinstance(r, tuple) else i
                rng = example_rng(self.cfg.seed, 0, draw)
                if rng.random() < self.cfg.augment:
                    seqs.append(encode_texts(self.tokenizer, [self.augmenter(texts[i], rng)], self.block_size)[0])
                else:
                    seqs.append(self._ids(split)[i])
        else:
            ids = self._ids(split)
            seqs = [ids[i] for i in idx]
        batch = collate_ids(seqs, self.tokenizer.pad_token_id, getattr(self.tokenizer, "padding_side", "right"))
        batch["labels"] = torch.as_tensor(y[idx], dtype=torch.long)
        return batch

    # --- loss and metrics -------------------------------------------------------------------------------------
    def batch_units(self, batch: Batch) -> float:
        return float(len(batch["labels"]))  # one unit per example

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        logits = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
        weight = None
        if self.class_weights is not None:
            weight = torch.as_tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        # The sum of (weighted) per-example losses; the loop divides by the examples of the global batch. Balanced
        # weights average to 1 over the training set, so this is the weighted mean that scikit-learn's
        # class_weight="balanced" optimises.
        return F.cross_entropy(logits.float(), batch["labels"], weight=weight, reduction="sum")

    def predict_split(
        self, model: Any, split: str = "val", max_batches: int = 0, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, K), gold label ids (N,)) on a split, in length-sorted batches for speed."""
        import torch

        texts, y = self._split(split)
        ids = self._ids(split)
        n = len(ids) if max_batches <= 0 else min(len(ids), max_batches * batch_size)
        order = sorted(range(n), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        probs = np.zeros((n, len(self.labels)), dtype=np.float64)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, n, batch_size):
                chunk = order[start : start + batch_size]
                b = collate_ids([ids[i] for i in chunk], self.tokenizer.pad_token_id)
                logits = classifier_logits(model, b["input_ids"].to(device), b["attention_mask"].to(device))
                probs[chunk] = torch.softmax(logits.float(), -1).cpu().numpy()
        model.train(was_training)
        return probs, y[:n]

    def evaluate(self, model: Any, max_batches: int = 0, batch_size: int = 8, split: str = "val") -> dict[str, float]:

        probs, y = self.predict_split(model, split, max_batches, batch_size)
        if len(y) == 0:
            return {}
        m = classification_metrics(y, probs.argmax(-1), self.labels)
        val_loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
        return {"val_loss": val_loss, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    # --- model and checkpoint ---------------------------------------------------------------------------------
    def model_config_overrides(self) -> dict[str, Any]:
        # pad_token_id is set in prepare_model: the preset builder passes the tokenizer's already.
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def prepare_model(self, model: Any) -> None:
        """Called by the loop on the built model: set the pad id the head pools by; freeze the body if asked."""
        if getattr(model.config, "pad_token_id", None) != self.tokenizer.pad_token_id:
            model.config.pad_token_id = int(self.tokenizer.pad_token_id)
        if self.cfg.freeze_body:
            freeze_body(model)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    def generation_eos_ids(self) -> list[int] | None:
        return None
