"""`owngpt download`: fetch a checkpoint from the Hugging Face Hub, safetensors weights only."""

from __future__ import annotations

import argparse

HELP = "fetch a checkpoint from the Hugging Face Hub (safetensors only)"
DESCRIPTION = """Download a model from the Hugging Face Hub: its safetensors weights, config.json, generation config
and tokenizer files, nothing else. A repository that offers only pickled weights (*.bin, *.pt, *.ckpt) is refused,
because loading a pickle can run arbitrary code.

Without --out the model goes into the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE), where
`--model MODEL_ID` finds it later, also offline. With --out it becomes a plain directory you can copy to a machine
without a network and pass as `--model DIR`.

examples:
  owngpt download openai-community/gpt2
  owngpt download Qwen/Qwen2.5-0.5B-Instruct --out models/qwen2.5-0.5b
  owngpt download ORG/MODEL --revision refs/pr/1 --out models/x   # e.g. a pull request that added safetensors
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID", help="a Hub model id, e.g. openai-community/gpt2")
    p.add_argument(
        "--revision", default=None, help="a branch, tag or commit of the repository (default: main), e.g. refs/pr/1"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the checkpoint to this new directory instead of the Hugging Face cache",
    )


def run(args: argparse.Namespace) -> int:
    from owngpt.hub import download
    from owngpt.models import preset_name

    if preset_name(args.model_id) is not None:
        from owngpt.errors import ConfigError

        raise ConfigError(
            f"{args.model_id} is a from-scratch preset, not a Hub model: it needs no download "
            f"(`owngpt train --model {args.model_id}`)"
        )
    path = download(args.model_id, revision=args.revision, out=args.out)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"{args.model_id}: {size / 1e6:,.1f} MB in {path}")
    print(f"use it with --model {args.model_id if args.out is None else path}")
    return 0
