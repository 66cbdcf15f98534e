"""`owngpt demo`: the whole path on bundled data in minutes — prepare, train a small GPT on the CPU, sample.

Tiny Shakespeare at character level on nanoGPT's CPU budget (4 layers, 4 heads, 128 dims, block 64, batch 12, warmup
100, cosine to lr/10), or the Tang poems (`--corpus tang`) at character level. The model is owngpt's best measured
from-scratch recipe, a LLaMA-style `llama-tiny` trained with Muon (+ AdamW for embeddings and norms): on that budget it
reaches a far lower validation loss than nanoGPT's GPT-2 + AdamW at about the same speed (docs/benchmarks.md, section
"from-scratch recipes"). What it leaves behind is
an ordinary data dir and run dir: the printed commands continue with generate, chat and serve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from owngpt.api import load
from owngpt.config import TrainConfig
from owngpt.data.prepare import PrepareConfig, prepare
from owngpt.errors import ConfigError
from owngpt.train import train


@dataclass(frozen=True)
class Corpus:
    file: str
    doc_sep: str
    prompts: tuple[str, ...]
    max_steps: int
    block_size: int
    description: str


CORPORA = {
    "shakespeare": Corpus(
        "tinyshakespeare.txt",
        "file",
        ("ROMEO:", "JULIET:\nO ", "KING HENRY:\n"),
        2000,
        64,
        "Tiny Shakespeare (1.1 MB of English plays)",
    ),
    "tang": Corpus(
        "tang300.txt", "%", ("床前明月光，", "春眠不觉晓，", "白日依山尽，"), 1500, 128, "唐诗三百首 (313 Tang poems)"
    ),
}


# the best from-scratch recipe measured on nanoGPT's CPU budget (bench/bench_recipes.py; docs/benchmarks.md)
DEMO_MODEL = "llama-tiny"
DEMO_RECIPE = (
    "a LLaMA-style model (rotary positions, RMSNorm, SwiGLU; 4 layers, 4 heads, 128 dims) trained with Muon on its "
    "hidden matrices and AdamW on embeddings and norms, because on this budget it learns much more per step than "
    "nanoGPT's GPT-2 + AdamW recipe at about the same speed (docs/benchmarks.md, 'from-scratch recipes')"
)


def sample_file(name: str) -> Path:
    return Path(str(resources.files("owngpt") / "sample_data" / name))


def run_demo(
    corpus: str = "shakespeare",
    out: str | None = None,
    max_steps: int | None = None,
    samples: int = 3,
    max_new_tokens: int = 500,
    seed: int = 1337,
    overwrite: bool = False,
) -> Path:
    """Prepare, train and sample; returns the best checkpoint dir."""

    if corpus not in CORPORA:
        raise ConfigError(f"--corpus {corpus}: expected one of {', '.join(CORPORA)}")
    c = CORPORA[corpus]
    root = Path(out or f"runs/demo-{corpus}")
    data_dir, run_dir = root / "data", root / "run"
    t0 = time.perf_counter()
    print(f"owngpt demo: {c.description} -> {root}/", flush=True)
    if not (data_dir / "meta.json").exists() or overwrite:
        print("\n[1/3] prepare: clean, split and tokenize (character level)", flush=True)
        res = prepare(
            PrepareConfig(
                sources=[str(sample_file(c.file))],
                out=str(data_dir),
                doc_sep=c.doc_sep,
                tokenizer="char",
                seed=seed,
                overwrite=overwrite,
            )
        )
        print(res.report_text, flush=True)
    else:
        print(f"\n[1/3] prepare: reusing {data_dir}", flush=True)
    print(
        f"\n[2/3] train: {DEMO_MODEL} from scratch on this CPU: {DEMO_RECIPE}",
        flush=True,
    )
    steps = max_steps or c.max_steps
    cfg = TrainConfig(
        task="lm",
        data=str(data_dir),
        out=str(run_dir),
        model=DEMO_MODEL,
        optimizer="muon",
        max_steps=steps,
        batch_size=12,
        block_size=c.block_size,
        lr=1e-3,
        muon_lr=0.02,
        min_lr=1e-4,
        warmup_steps=min(100, steps // 10),
        schedule="cosine",
        eval_every=max(steps // 8, 1),
        eval_batches=50,
        dropout=0.0,
        seed=seed,
        overwrite=True,
    ).validate()
    result = train(cfg)
    ckpt = result.best_checkpoint or result.last_checkpoint
    print(
        f"\n[3/3] samples from {ckpt} (temperature 0.8, top-k 50; {max_new_tokens} characters, the model reads the "
        f"last {c.block_size} it was trained on)",
        flush=True,
    )
    m = load(str(ckpt))  # loads quietly: no "Loading weights" bar between the samples
    for i, prompt in enumerate(c.prompts[:samples]):
        text = m.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i)
        print(f"\n--- sample {i + 1} ---\n{prompt}{text}", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    vl = result.metrics.get("val_loss")
    print(
        f"\ndone in {minutes:.1f} min; validation loss {vl:.3f}" if vl is not None else f"\ndone in {minutes:.1f} min"
    )
    print(f"""
next:
  owngpt generate {ckpt} --prompt "{c.prompts[0]}" --max-new-tokens 300
  owngpt chat {ckpt}
  owngpt serve {ckpt} --api-key change-me        # then open http://127.0.0.1:8000/
  owngpt eval {ckpt} --data {data_dir}
  loss curve: {run_dir}/loss.png""")
    return Path(ckpt)
