"""`owngpt export`: a checkpoint as a plain Hugging Face dir, an int8 checkpoint, an ONNX graph or a GGUF file."""

from __future__ import annotations

import argparse

from owngpt.commands.flags import add_device_argument

HELP = "export a checkpoint: hf, int8, onnx, gguf"
DESCRIPTION = """Export a checkpoint for deployment, then measure the result against the original.

targets (--to):
  hf     plain Hugging Face dir (LoRA merged, safetensors, tokenizer + chat template); transformers loads it alone
  int8   int8 weights (per-channel scales) + int8 dynamic activations on every projection incl. the LM head;
         ~4x smaller, faster decode on CPU; loads in `owngpt generate/chat/serve OUT`
  onnx   OUT/model.onnx with a KV cache (inputs input_ids, attention_mask, position_ids,
         past_key_values.N.key/value; outputs logits, present.N.key/value) for onnxruntime; logits checked
         against PyTorch at export (max |difference| <= 1e-3)
  gguf   OUT/model.gguf for llama.cpp (GPT-2 and LLaMA architectures; others: --to hf, then llama.cpp's
         convert_hf_to_gguf.py), weights in f32, f16 or q8_0 (--gguf-type); run it with
         `llama-cli -m OUT/model.gguf` or llama-cpp-python

Every export writes OUT/report.json and prints: size on disk of the weights, decode tokens/s (greedy, batch 1) and,
with --data or --eval-file, perplexity on that validation text, for the original and the result.

examples:
  owngpt export runs/shake/checkpoints/best --out deploy/int8 --to int8 --data data/shake
  owngpt export runs/chat/checkpoints/best --out deploy/onnx --to onnx
  owngpt export runs/shake/checkpoints/best --out deploy/gguf --to gguf --gguf-type q8_0"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the checkpoint dir to export (e.g. RUN/checkpoints/best)")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export with --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is an owngpt checkpoint or export (never a run, a data dir or your own files; "
        "the old one stays whole until the new one is complete)",
    )
    p.add_argument("--to", required=True, choices=["hf", "int8", "onnx", "gguf"], help="export format (see above)")
    p.add_argument(
        "--data", default=None, help="a language-modelling data dir (same tokenizer): its val split measures perplexity"
    )
    p.add_argument("--eval-file", default=None, help="a UTF-8 text file to measure perplexity on (instead of --data)")
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="score at most this many validation tokens (default 8192)"
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="tokens generated per decode-speed run (median of 3, interleaved with the original; "
        "default 32; 0 skips the speed measurement)",
    )
    p.add_argument(
        "--gguf-type",
        default="f16",
        choices=["f32", "f16", "q8_0"],
        help="gguf only: how the weight matrices are stored; norms, biases and GPT-2's position table stay f32, as "
        "in llama.cpp's own converter. f32: exact (4 bytes a weight); f16 (default): half the size; q8_0: about "
        "0.27x of f32 (8-bit weights in blocks of 32 with an f16 scale), faster than f16 in llama.cpp on a CPU; "
        "a matrix whose rows are not a multiple of 32 falls back to f16. Checked in llama.cpp on small trained "
        "models: greedy tokens equal owngpt's for all three, logits within 2e-3 (f16) and 3e-2 (q8_0); see "
        "docs/deploy.md",
    )
    p.add_argument("--no-measure", action="store_true", help="write the export only; skip speed and perplexity")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from owngpt.errors import ConfigError
    from owngpt.export import export
    from owngpt.measure import format_report

    if args.eval_tokens < 2 or args.decode_tokens < 0:
        raise ConfigError("--eval-tokens must be at least 2 and --decode-tokens at least 0")
    rep = export(
        args.checkpoint,
        args.out,
        args.to,
        data=args.data,
        eval_file=args.eval_file,
        eval_tokens_max=args.eval_tokens,
        decode_tokens=args.decode_tokens,
        gguf_type=args.gguf_type,
        measure_result=not args.no_measure,
        overwrite=args.overwrite,
        device=args.device,
    )
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"exported {args.checkpoint} -> {args.out} ({args.to})")
        if "ratios" in rep:
            print(format_report(rep))
        print(f"report: {args.out}/report.json", file=sys.stderr)
    return 0
