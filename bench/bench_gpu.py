"""Speed on a GPU: owngpt's training loop against nanoGPT's own train.py, same machine, same run.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT    # read and run from a temp copy, never imported
    PYTHONPATH=src python bench/bench_gpu.py --nanogpt /tmp/nanoGPT                  # the GPU table (bench:gpu)
    PYTHONPATH=src python bench/bench_gpu.py --nanogpt /tmp/nanoGPT --quick --device cpu --no-write   # a check

Two configurations, as in the GPU issue (#20), each trained by both programs from scratch on Tiny Shakespeare
(characters, nanoGPT's 90/10 split by position):

  shakespeare  nanoGPT's GPU recipe (config/train_shakespeare_char.py): 6 layers, 6 heads, 384 dims, block 256,
               batch 64, dropout 0.2, lr 1e-3 cosine to 1e-4, warmup 100, beta2 0.99; compiled; 2,000 iterations
  gpt2         the GPT-2 124M shape (12 layers, 12 heads, 768 dims), block 1024, batch 16, lr 6e-4 to 6e-5,
               beta2 0.95, dropout 0; compiled and eager; 300 iterations (the character vocabulary makes it 85M
               parameters, but every matmul of the body is GPT-2 small's)

What is reported, per configuration and mode:
  - tokens/s: the median over log windows (every 10 iterations) after the first 20% of the run (compilation,
    warmup). nanoGPT: the arrival times of its `iter N:` lines, each printed after a `loss.item()` (a sync), read
    unbuffered; owngpt: its own `tokens_per_s` records in metrics.jsonl, each window closed by a device read.
  - MFU: tokens/s x FLOPs per token (6N + 12·L·d·T, nanoGPT's and PaLM's count; the same N for both) divided by
    this device's bf16 matmul rate measured here (8192² matmuls), not a datasheet peak.
  - validation loss at equal steps: both final weights scored the same way here, over the whole validation split
    in windows of the block size (owngpt.evaluate.lm_stream_loss), in fp32 on the device.

Both use bf16 autocast on a GPU with bf16 (nanoGPT's default dtype there; owngpt's precision=auto) and fused AdamW.
The models differ where the recipes do not fix them: nanoGPT's has no biases (bias=False) and the tanh GELU;
transformers' GPT-2 (owngpt's) has biases and the exact GELU. nanoGPT's data files are written here in its
format (what its shakespeare_char/prepare.py writes, without the download it would try). Needs only torch,
transformers, safetensors, tokenizers, tqdm, pyyaml and numpy (owngpt from src via PYTHONPATH).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import _doc  # bench/ is on sys.path when a script runs
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "src" / "owngpt" / "sample_data" / "tinyshakespeare.txt"

# (owngpt preset, nanoGPT flags, steps, modes); the shared recipe is nanoGPT's config/train_shakespeare_char.py
CONFIGS: dict[str, dict] = {
    "shakespeare": dict(
        preset="small", n_layer=6, n_head=6, n_embd=384, block=256, batch=64, dropout=0.2, lr=1e-3, min_lr=1e-4,
        beta2=0.99, warmup=100, steps=2000, modes=("compiled",),
    ),
    "gpt2": dict(
        preset="scratch:gpt2", n_layer=12, n_head=12, n_embd=768, block=1024, batch=16, dropout=0.0, lr=6e-4,
        min_lr=6e-5, beta2=0.95, warmup=100, steps=300, modes=("compiled", "eager"),
    ),
}  # fmt: skip
# --quick: the same pipeline with a tiny model, for a CPU check of the script itself (numbers mean nothing)
QUICK = dict(preset="tiny", n_layer=4, n_head=4, n_embd=128, block=32, batch=4, warmup=5, steps=30, val_tokens=4096)
LOG_EVERY = 10


# --- data ------------------------------------------------------------------------------------------------------
def nanogpt_copy(checkout: Path, work: Path) -> Path:
    """A copy of the checkout with data/shakespeare_char/{train,val}.bin and meta.pkl in nanoGPT's format."""
    need = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"]
    missing = [f for f in need if not (checkout / f).is_file()]
    if missing:
        sys.exit(f"--nanogpt {checkout}: not a nanoGPT checkout (no {', '.join(missing)})")
    dst = work / "nanoGPT"
    shutil.copytree(checkout, dst, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "meta.pkl"))
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    data = dst / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data / f"{name}.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))  # nanoGPT reads its vocabulary size from this file
    return dst


def owngpt_data(work: Path) -> Path:
    from owngpt.data.prepare import PrepareConfig, prepare

    out = work / "char"  # the defaults split by position like nanoGPT (bench_nanogpt checks the val sizes agree)
    prepare(PrepareConfig(sources=[str(SHAKESPEARE)], out=str(out), tokenizer="char", progress=False, quiet=True))
    return out


# --- the two programs ----------------------------------------------------------------------------------------------
def run_nanogpt(repo: Path, c: dict, mode: str, device: str, out: str) -> dict:
    """nanoGPT's train.py on config `c`; its tokens/s from the arrival times of its log lines."""
    steps = c["steps"]
    dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    flags = [
        f"--n_layer={c['n_layer']}", f"--n_head={c['n_head']}", f"--n_embd={c['n_embd']}",
        f"--block_size={c['block']}", f"--batch_size={c['batch']}", f"--dropout={c['dropout']}",
        f"--learning_rate={c['lr']}", f"--min_lr={c['min_lr']}", f"--beta2={c['beta2']}",
        f"--warmup_iters={c['warmup']}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
        f"--eval_interval={steps}", "--eval_iters=20", f"--log_interval={LOG_EVERY}", "--always_save_checkpoint=True",
        f"--out_dir={out}", f"--device={device}", f"--dtype={dtype}", f"--compile={mode == 'compiled'}",
    ]  # fmt: skip
    cmd = [sys.executable, "-u", "train.py", "config/train_shakespeare_char.py", *flags]
    seen: list[tuple[int, float]] = []
    log: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        m = re.match(r"iter (\d+): loss", line)
        if m:
            seen.append((int(m.group(1)), time.perf_counter()))
    if proc.wait() != 0:
        sys.exit(f"nanoGPT's train.py failed ({mode}):\n{''.join(log[-40:])}")
    tokens_per_iter = c["batch"] * c["block"]
    rates = [
        (b[0] - a[0]) * tokens_per_iter / (b[1] - a[1])
        for a, b in zip(seen, seen[1:])
        if a[0] >= 0.2 * steps and b[0] < steps and b[1] > a[1]  # the last window holds nanoGPT's final eval
    ]
    val = nanogpt_val_loss(repo, repo / out / "ckpt.pt", steps, c["block"], device, c.get("val_tokens"))
    return {"tokens_per_s": statistics.median(rates), "val_loss": val, "wall_s": time.perf_counter() - t0}


def nanogpt_val_loss(repo: Path, ckpt_path: Path, steps: int, block: int, device: str, limit: int | None) -> float:
    """nanoGPT's final weights scored like owngpt's: the whole val split, windows of the block size, fp32."""
    from owngpt.evaluate import lm_stream_loss

    spec = importlib.util.spec_from_file_location("nanogpt_model", repo / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # tensors and numbers this run wrote
    if ck["iter_num"] != steps:
        sys.exit(f"{ckpt_path}: saved at iteration {ck['iter_num']}, expected {steps}")
    gpt = mod.GPT(mod.GPTConfig(**ck["model_args"]))
    gpt.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
    gpt.to(device).eval()

    class AsCausalLM(torch.nn.Module):
        """nanoGPT's GPT behind the call lm_stream_loss makes (right padding is never attended to: causal)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            logits, _ = self.inner(input_ids, targets=input_ids)  # with targets: logits at every position
            return SimpleNamespace(logits=logits)

    val = np.memmap(repo / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r")
    nll, n = lm_stream_loss(AsCausalLM(gpt), val, block, batch_size=8, max_tokens=limit, progress=False)
    return nll / n


def run_owngpt(data: Path, c: dict, mode: str, device: str, out: Path) -> dict:
    """`owngpt train` on config `c` in a subprocess (as a user runs it); tokens/s from its metrics.jsonl."""
    steps = c["steps"]
    cmd = [
        sys.executable, "-m", "owngpt", "train", "--data", str(data), "--out", str(out), "--model", c["preset"],
        "--max-steps", str(steps), "--batch-size", str(c["batch"]), "--block-size", str(c["block"]),
        "--lr", str(c["lr"]), "--dropout", str(c["dropout"]), "--warmup-steps", str(c["warmup"]),
        "--device", device, "--seed", "1337", f"min_lr={c['min_lr']}", f"beta2={c['beta2']}", "beta1=0.9",
        "weight_decay=0.1", "grad_clip=1.0", "schedule=cosine", f"eval_every={steps}", "eval_batches=1",
        f"log_every={LOG_EVERY}", f"compile={mode == 'compiled'}", "--overwrite",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"owngpt train failed ({mode}):\n{res.stderr[-4000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] - LOG_EVERY >= 0.2 * steps]
    from owngpt.checkpoint import load_model
    from owngpt.data.datadir import open_data_dir
    from owngpt.evaluate import lm_stream_loss

    model = load_model(out / "checkpoints" / "last").to(device).eval()
    val = open_data_dir(data).tokens("val")
    nll, n = lm_stream_loss(model, val, c["block"], batch_size=8, max_tokens=c.get("val_tokens"), progress=False)
    return {"tokens_per_s": statistics.median(rates), "val_loss": nll / n, "wall_s": time.perf_counter() - t0}


# --- the device ----------------------------------------------------------------------------------------------------
def matmul_rate(device: str) -> tuple[float, str]:
    """(FLOP/s, dtype) of big matmuls on `device`: bf16 8192² on a GPU, fp32 1024² on a CPU (the --quick check)."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for i in range(12):
        if gpu:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        if gpu:
            torch.cuda.synchronize(dev)
        if i >= 2:  # the first calls pick kernels and warm clocks
            times.append((time.perf_counter() - t) / 10)
    return 2 * n**3 / statistics.median(times), str(dtype).removeprefix("torch.")


def flops_per_token(c: dict, vocab: int) -> float:
    """6N + 12·L·d·T (nanoGPT's estimate_mfu, after PaLM), N the body's matmuls plus the tied embedding."""
    L, d, T = c["n_layer"], c["n_embd"], c["block"]
    n_params = 12 * L * d * d + vocab * d
    return 6 * n_params + 12 * L * d * T


def machine(device: str) -> str:
    import transformers

    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}"
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return f"{name}, torch {torch.__version__}, transformers {transformers.__version__}"


def git_commit(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# --- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, type=Path, help="a checkout of github.com/karpathy/nanoGPT")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --quick")
    ap.add_argument("--configs", default="shakespeare,gpt2", help="which of shakespeare, gpt2 (comma-separated)")
    ap.add_argument("--steps", type=int, default=None, help="iterations for every configuration (default: each's)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, eager, 30 steps: checks the script only")
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: this torch sees no CUDA GPU; on a CPU run --quick --device cpu to check the script")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")

    work = Path(tempfile.mkdtemp(prefix="owngpt-bench-gpu-"))
    print(f"work dir {work}", file=sys.stderr)
    repo = nanogpt_copy(args.nanogpt.resolve(), work)
    data = owngpt_data(work)
    vocab = pickle.loads((repo / "data" / "shakespeare_char" / "meta.pkl").read_bytes())["vocab_size"]
    peak, peak_dtype = matmul_rate(args.device)
    print(f"{peak_dtype} matmul: {peak / 1e12:.3g} TFLOP/s on {machine(args.device)}", file=sys.stderr)

    rows = []
    for name in names:
        c = dict(CONFIGS[name], **(QUICK if args.quick else {}))
        if args.quick:
            c["modes"] = ("eager",)  # compiling on a CPU takes minutes: the check runs the eager path
        if args.steps:
            c["steps"] = args.steps
        fpt = flops_per_token(c, vocab)
        for mode in c["modes"]:
            tag = f"{name}-{mode}"
            ref = run_nanogpt(repo, c, mode, args.device, f"out-{tag}")
            own = run_owngpt(data, c, mode, args.device, work / f"own-{tag}")
            rows.append((name, mode, c, ref, own, fpt))
            print(
                f"{tag}: nanoGPT {ref['tokens_per_s']:,.0f} tokens/s, val {ref['val_loss']:.4f}; owngpt "
                f"{own['tokens_per_s']:,.0f} tokens/s, val {own['val_loss']:.4f}; "
                f"ratio {own['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
                file=sys.stderr,
            )

    def rate(x: float) -> str:
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:.0f}"

    def shape(c: dict) -> str:
        return f"{c['n_layer']}L/{c['n_head']}H/{c['n_embd']}, block {c['block']}, batch {c['batch']}"

    lines = "".join(
        f"| {name} ({shape(c)}), {mode}, {c['steps']} iters | {rate(ref['tokens_per_s'])} | "
        f"{rate(own['tokens_per_s'])} | **{own['tokens_per_s'] / ref['tokens_per_s']:.2f}x** | "
        f"{ref['tokens_per_s'] * fpt / peak:.0%} / {own['tokens_per_s'] * fpt / peak:.0%} | "
        f"{ref['val_loss']:.4f} / {own['val_loss']:.4f} |\n"
        for name, mode, c, ref, own, fpt in rows
    )
    scored = f"the first {QUICK['val_tokens']:,} tokens of the" if args.quick else "the whole"
    flags = " --quick" if args.quick else ""
    flags += "" if args.device == "cuda" else f" --device {args.device}"
    flags += f" --configs {','.join(names)}" if names != list(CONFIGS) else ""
    flags += f" --steps {args.steps}" if args.steps else ""
    body = f"""
## GPU training speed: owngpt against nanoGPT's train.py

Command: `PYTHONPATH=src python bench/bench_gpu.py --nanogpt NANOGPT_CHECKOUT{flags}` (owngpt {git_commit(ROOT)},
nanoGPT {git_commit(args.nanogpt)}) — {time.strftime("%Y-%m-%d")}, {machine(args.device)}. {peak_dtype} matmul
measured at {peak / 1e12:.3g} TFLOP/s: the MFU denominator.

Both programs train the same configuration from scratch on Tiny Shakespeare (characters) in the same run; tokens/s
is the median over 10-iteration windows after the first 20% of the run; MFU counts 6N + 12·L·d·T FLOPs per token;
validation loss is both final models scored alike over {scored} validation split. nanoGPT's model has no biases
and the tanh GELU; transformers' GPT-2 (owngpt's) has biases and the exact GELU.

| configuration | nanoGPT tokens/s | owngpt tokens/s | owngpt / nanoGPT | MFU nanoGPT / owngpt | val loss nanoGPT / owngpt |
|---|---|---|---|---|---|
{lines}"""
    print(body)
    if not args.no_write:
        _doc.write_section("gpu", body)


if __name__ == "__main__":
    main()
