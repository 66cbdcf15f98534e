"""Server throughput and latency: continuous batching vs dynamic batching, same server code, same run.

    python bench/bench_serve.py                        # 4 layers x 256 dims random GPT-2, 1/8/32 clients
    python bench/bench_serve.py --rounds 3 --max-tokens 32

Two `owngpt serve` subprocesses on loopback serve the same random checkpoint with `--max-batch-size 32`: one with
continuous batching (`--scheduler continuous`: a request joins the running batch at the next decode step), one with
dynamic batching (`--scheduler dynamic`, the scheduler owngpt had before: a batch runs to its end, then the next
starts). For each number of concurrent clients (each sends its next request as soon as the previous one is
answered), both servers get the same bounded number of completion requests (`ignore_eos`; request i generates
--max-tokens x (1/2, 1, 2)[i % 3] tokens: real requests differ in length, which is where the schedulers differ).
Servers and client counts are interleaved round by round (A B A B ...): the reported requests/s is the median over
rounds, latencies are pooled over rounds. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "serve"
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nFirst Citizen:\nBefore we proceed any further.\n"


import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)


def build_checkpoint(out: Path, n_layer: int, n_embd: int, ctx: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from owngpt.chat_format import CHAT_TEMPLATE
    from owngpt.checkpoint import save_checkpoint
    from owngpt.tokenizer import char_tokenizer

    tok = char_tokenizer([TEXT])
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=ctx,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=max(1, n_embd // 64),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    meta = {"task": "lm", "source": {"kind": "preset", "name": f"bench-{n_layer}x{n_embd}"}, "step": 0}
    return save_checkpoint(out, model, tok, meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    ckpt: Path, max_batch: int, threads: int, log: Path, scheduler: str | None = "continuous", src: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`owngpt serve` on a free port; `src`: another owngpt source tree to run (its `src/` goes on PYTHONPATH)."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "owngpt",
        "serve",
        str(ckpt),
        "--port",
        str(port),
        "--api-key",
        "bench",
        "--max-batch-size",
        str(max_batch),
        *(["--scheduler", scheduler] if scheduler else []),
        "--max-queue",
        "1024",
        "--threads",
        str(threads),
        "--log-level",
        "warning",
    ]
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src) / "src")
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server not healthy after 300 s:\n{log.read_text()}")


def request_tokens(i: int, max_tokens: int) -> int:
    """Tokens request i generates: half, once or twice --max-tokens, in turn."""
    return max(1, (max_tokens * (1, 2, 4)[i % 3]) // 2)


async def load_test(base: str, clients: int, total: int, max_tokens: int) -> tuple[float, list[float]]:
    """`clients` concurrent loops sending `total` requests in all; returns (wall seconds, per-request latencies)."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(total))
    headers = {"Authorization": "Bearer bench"}

    async def worker(http: httpx.AsyncClient) -> None:
        for i in counter:
            body = {
                "model": model_id,
                "prompt": f"{i} {TEXT[: 20 + i % 20]}",
                "max_tokens": request_tokens(i, max_tokens),
                "temperature": 0.8,
                "ignore_eos": True,
            }
            t = time.perf_counter()
            r = await http.post(f"{base}/v1/completions", json=body, headers=headers)
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        model_id = (await http.get(f"{base}/v1/models", headers=headers)).json()["data"][0]["id"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="requests per client per measurement (at least 16 in all), so that batches reach their steady size",
    )
    ap.add_argument("--max-requests", type=int, default=64, help="at most this many requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="--max-batch-size of both servers")
    ap.add_argument("--threads", type=int, default=1, help="--threads of both servers (1: the machine is shared)")
    ap.add_argument(
        "--old-src",
        help="also serve with another owngpt source tree (e.g. `git archive 0b380db src | tar -x -C DIR`): the "
        "dynamic batching owngpt had before the one engine, on transformers' generate",
    )
    ap.add_argument("--old-label", default="main 0b380db", help="what --old-src is, for the table")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()

    modes: dict[str, tuple[str | None, str | None]] = {
        "continuous": ("continuous", None),
        "dynamic": ("dynamic", None),
    }
    if args.old_src:
        modes["old"] = (None, args.old_src)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = build_checkpoint(Path(tmp) / "ckpt", args.layers, args.dims, ctx=256)
        servers = {
            m: start_server(ckpt, args.batch_size, args.threads, Path(tmp) / f"{m}.log", scheduler=sch, src=src)
            for m, (sch, src) in modes.items()
        }
        load0 = os.getloadavg()[0]
        try:
            for rnd in range(args.rounds):
                for clients in args.clients:
                    total = max(16, min(args.requests_per_client * clients, args.max_requests))
                    for mode, (_, base) in servers.items():
                        wall, lats = asyncio.run(load_test(base, clients, total, args.max_tokens))
                        r = results.setdefault((mode, clients), {"rps": [], "lat": []})
                        r["rps"].append(total / wall)
                        r["lat"] += lats
                        print(
                            f"round {rnd + 1} {mode:>13} {clients:>3} clients: {total / wall:6.2f} req/s, "
                            f"p50 {pct(lats, 0.5) * 1000:6.0f} ms",
                            flush=True,
                        )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
        load1 = os.getloadavg()[0]

    body = report(args, results, max(load0, load1))
    print(body)
    if not args.no_write:
        write_section(body)
    return 0


def report(args, results, load: float) -> str:
    lengths = "/".join(str(request_tokens(i, args.max_tokens)) for i in range(3))
    lines = [
        "## Server: continuous batching vs dynamic batching (`bench/bench_serve.py`)",
        "",
        f"Random GPT-2, {args.layers} layers x {args.dims} dims, char tokenizer; request i generates exactly "
        f"{lengths} tokens for i mod 3 = 0/1/2 (`ignore_eos`, temperature 0.8). Each client sends its next request "
        f"when the previous one is answered; {args.requests_per_client} requests per client per measurement (at "
        f"least 16, at most {args.max_requests}), {args.rounds} rounds interleaved. Both servers run "
        f"`--threads {args.threads} --max-batch-size {args.batch_size}`; continuous = `--scheduler continuous` (the "
        "default: a request joins the running batch at the next step), dynamic = `--scheduler dynamic` (the "
        "scheduler before: a batch runs to its end). requests/s: median over rounds; speed-up: median over rounds "
        "of the ratio within a round; latency percentiles pooled over rounds.",
        "",
        "| clients | continuous req/s | dynamic req/s | speed-up | continuous p50 / p99 (ms) | "
        "dynamic p50 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in args.clients:
        b, s = results[("continuous", c)], results[("dynamic", c)]
        rb, rs = statistics.median(b["rps"]), statistics.median(s["rps"])
        # the speed-up compares the two servers within each round (measured back to back), then takes the median
        speedup = statistics.median(x / y for x, y in zip(b["rps"], s["rps"]))
        lines.append(
            f"| {c} | {rb:.2f} | {rs:.2f} | {speedup:.2f}x | {pct(b['lat'], 0.5) * 1000:.0f} / "
            f"{pct(b['lat'], 0.99) * 1000:.0f} | {pct(s['lat'], 0.5) * 1000:.0f} / "
            f"{pct(s['lat'], 0.99) * 1000:.0f} |"
        )
    if ("old", args.clients[0]) in results:
        lines += [
            "",
            f"The same load in the same rounds against the server of {args.old_label} (dynamic batching over "
            "transformers' `generate`, before the one engine):",
            "",
            f"| clients | {args.old_label} req/s | continuous vs it | {args.old_label} p50 / p99 (ms) |",
            "|---:|---:|---:|---:|",
        ]
        for c in args.clients:
            b, o = results[("continuous", c)], results[("old", c)]
            speedup = statistics.median(x / y for x, y in zip(b["rps"], o["rps"]))
            lines.append(
                f"| {c} | {statistics.median(o['rps']):.2f} | {speedup:.2f}x | {pct(o['lat'], 0.5) * 1000:.0f} / "
                f"{pct(o['lat'], 0.99) * 1000:.0f} |"
            )
    cmd = "python bench/bench_serve.py" + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    if args.old_src:
        cmd = "git archive 0b380db src | tar -x -C /tmp/owngpt-old && " + cmd + " --old-src /tmp/owngpt-old"
    lines += [
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.1f}"
        + (
            " (other work shared the CPU: absolute numbers are low; the ratio is what this compares)."
            if load > 1.5
            else "."
        ),
        "",
        f"Reproduce: `{cmd}`",
    ]
    return "\n".join(lines)


def write_section(body: str) -> None:
    _doc.write_section(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
