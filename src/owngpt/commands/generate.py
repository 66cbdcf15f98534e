"""`owngpt generate CKPT`: continue prompts, or sample from nothing, with any of transformers' decoding methods."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from owngpt.commands.flags import add_device_argument
from owngpt.decode_kernels import prefer_huge_pages

HELP = "generate text from a checkpoint"
DESCRIPTION = """Generate text from a checkpoint (a dir with config.json + model.safetensors, e.g. RUN/checkpoints/last).

The output is the generated continuation only (--echo prints the prompt before it). One prompt and one sample are
streamed to the terminal as tokens arrive; several are printed one after the other under ==== SAMPLE n ==== lines.
Without a prompt the samples start from the end-of-text token (unconditional samples, like GPT-2's
generate_unconditional_samples).

examples:
  owngpt generate runs/shakespeare/checkpoints/last --prompt "ROMEO:" --max-new-tokens 200
  owngpt generate CKPT --prompt "KING" --temperature 0            # greedy: the same text every time
  owngpt generate CKPT --prompt "KING" --seed 3 --top-p 0.9       # a reproducible sample
  owngpt generate CKPT --num-samples 3                            # three unconditional samples
  owngpt generate CKPT --prompt-file prompts.txt --no-stream      # one prompt per line, as one batch
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from owngpt.commands.flags import add_sampling_arguments
    from owngpt.generation import SamplingParams

    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint dir (or a cached Hub id)")
    src = parser.add_argument_group("prompts")
    src.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="text to continue; repeat the flag for a batch of prompts",
    )
    src.add_argument("--prompt-file", metavar="FILE", help="UTF-8 file with one prompt per line (blank lines skipped)")
    src.add_argument("--whole-file", action="store_true", help="with --prompt-file: the whole file is one prompt")
    src.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="samples per prompt, or unconditional samples without a prompt (default 1)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    out.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    add_sampling_arguments(parser, SamplingParams())
    add_device_argument(parser)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from owngpt.errors import ConfigError, DataError

    prompts = list(args.prompt or [])
    if args.whole_file and not args.prompt_file:
        raise ConfigError("--whole-file needs --prompt-file FILE")
    if args.prompt_file:
        try:
            text = open(args.prompt_file, encoding="utf-8").read()
        except FileNotFoundError:
            raise ConfigError(f"--prompt-file {args.prompt_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{args.prompt_file}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        if args.whole_file:
            prompts.append(text)
        else:
            prompts += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        if not text.strip():
            raise DataError(f"{args.prompt_file}: the file is empty; put one prompt per line")
    return prompts


def run(args: argparse.Namespace) -> int:
    prefer_huge_pages()  # weights on 2 MiB pages: set before torch's first allocation
    from owngpt.errors import ConfigError

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples}: must be >= 1")
    prompts = _read_prompts(args)
    unconditional = not prompts
    if unconditional:
        prompts = [""]

    from transformers.utils import logging as hf_logging

    from owngpt.commands.flags import params_from_args
    from owngpt.device import inference_device
    from owngpt.generation import (
        encode_prompt,
        generate_batch,
        load_for_generation,
        use_one_thread_for_small_models,
    )

    hf_logging.disable_progress_bar()  # the weights load in well under a second; no bar on the terminal
    greedy_many = args.temperature == 0 and args.num_beams == 1 and args.num_samples > 1
    if greedy_many:
        raise ConfigError(
            f"--num-samples {args.num_samples} with --temperature 0: greedy decoding gives the same "
            "text every time; use a temperature > 0 (e.g. 0.8) or --num-beams"
        )
    params_from_args(args, num_return_sequences=args.num_samples)  # bad flags fail before the model loads
    lm = load_for_generation(args.checkpoint, device=inference_device(args.device))
    # any length: past the model's trained context the window slides (owngpt.engine)
    params = params_from_args(args, num_return_sequences=args.num_samples).validate(lm.context_length)
    use_one_thread_for_small_models(lm.model)
    # generate() drops an all-ones attention mask, and GPT-2 then warns "passing an attention_mask" whenever a
    # sampled token equals the pad id: a false alarm on the terminal (our batches always carry their mask). Set
    # after loading: with this logger above WARNING, from_pretrained logs a tensor-parallel report instead.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    tok = lm.tokenizer
    ids = [encode_prompt(tok, p) if p else [] for p in prompts]
    n_out = len(prompts) * params.num_return_sequences
    stream = n_out == 1 and not args.no_stream and params.num_beams == 1
    out = sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    t0 = time.perf_counter()
    if stream:
        if args.echo:
            write(prompts[0])
        results = generate_batch(lm.model, tok, ids, params, streamer_callback=lambda _row, piece: write(piece))
        if not results[0].text.endswith("\n"):
            write("\n")
    else:
        results = generate_batch(lm.model, tok, ids, params)
        for r in results:
            if n_out > 1:
                label = f"SAMPLE {r.index % params.num_return_sequences + 1}"
                if len(prompts) > 1:
                    label = f"PROMPT {r.prompt_index + 1} {label}"
                write(f"{'=' * 20} {label} {'=' * 20}\n")
            text = (prompts[r.prompt_index] if args.echo else "") + r.text
            write(text if text.endswith("\n") else text + "\n")
    dt = time.perf_counter() - t0
    n_tok = sum(r.completion_tokens for r in results)
    reasons = sorted({r.finish_reason for r in results})
    print(
        f"[{n_tok} tokens in {dt:.2f} s, {n_tok / max(dt, 1e-9):.1f} tokens/s; finished by: {', '.join(reasons)}]",
        file=sys.stderr,
    )
    return 0
