"""`owngpt chat CKPT`: a multi-turn conversation in the terminal, optionally reranked by an MMI model."""

from __future__ import annotations

import argparse
import logging
import sys

from owngpt.commands.flags import add_device_argument
from owngpt.decode_kernels import prefer_huge_pages

HELP = "talk to a checkpoint in the terminal"
DESCRIPTION = """Talk to a checkpoint in the terminal. Type a message and press Enter; answers stream as they are generated.

A chat-tuned checkpoint (trained with `--task chat`, or a Hugging Face chat model with a chat template) gets the
conversation in its chat template and answers until its end-of-turn token. A plain language model continues the
conversation written as text lines:
    User: <your message>
    Bot: <its answer>
and its answer ends at the next "User:" line or a blank line (--format forces either mode). The oldest turns are
dropped once the conversation no longer fits the model's context (minus --max-new-tokens).

commands: /help, /reset, /save FILE, /params, /set NAME VALUE (e.g. /set temperature 0.7), /system TEXT,
/exit (or Ctrl-D). Ctrl-C stops the current answer, not the session.

MMI (--mmi BACKWARD_CKPT, a model trained with `owngpt train --task mmi`): sample --candidates answers and reply
with the one from which the backward model best predicts the conversation (lowest loss); --debug shows them all.

examples:
  owngpt chat runs/chat/checkpoints/last --system "You are a helpful assistant."
  owngpt chat runs/chat/checkpoints/last --mmi runs/mmi/checkpoints/last --candidates 5 --debug
  echo "Hello" | owngpt chat CKPT --temperature 0        # works on a pipe too
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from owngpt.commands.flags import add_sampling_arguments
    from owngpt.generation import SamplingParams

    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint dir (or a cached Hub id)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt, kept when old turns are dropped")
    parser.add_argument(
        "--transcript",
        metavar="FILE",
        help='save the conversation as JSON {"messages": [...]} after every answer and on exit',
    )
    parser.add_argument(
        "--format",
        choices=("auto", "chat", "plain"),
        default="auto",
        help="chat = the checkpoint's chat template; plain = User:/Bot: text lines; auto (default) = "
        "chat for chat-tuned checkpoints",
    )
    mmi = parser.add_argument_group("MMI reranking")
    mmi.add_argument("--mmi", metavar="MMI_CKPT", help="backward model (owngpt train --task mmi) that reranks answers")
    mmi.add_argument(
        "--candidates", type=int, default=5, metavar="N", help="with --mmi: answers sampled per turn (default 5)"
    )
    mmi.add_argument("--debug", action="store_true", help="with --mmi: print every candidate and its loss (stderr)")
    add_sampling_arguments(parser, SamplingParams(max_new_tokens=128))
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    prefer_huge_pages()  # weights on 2 MiB pages: set before torch's first allocation
    from owngpt.errors import ConfigError

    if args.candidates < 1:
        raise ConfigError(f"--candidates {args.candidates}: must be >= 1")
    if args.mmi is None and args.debug:
        print("note: --debug shows MMI candidates; without --mmi it changes nothing", file=sys.stderr)

    from transformers.utils import logging as hf_logging

    from owngpt.chat import ChatREPL, ChatSettings, check_transcript_path, is_chat_model
    from owngpt.commands.flags import params_from_args
    from owngpt.device import inference_device
    from owngpt.generation import (
        context_length,
        load_for_generation,
        use_one_thread_for_small_models,
    )

    hf_logging.disable_progress_bar()
    params_from_args(args)  # bad flags fail before the model loads
    if args.transcript:  # and a --transcript that would replace a file of yours (ChatREPL checks again)
        check_transcript_path(args.transcript, [m for m in (args.checkpoint, args.mmi) if m], flag="--transcript")
    lm = load_for_generation(args.checkpoint, device=inference_device(args.device))
    params = params_from_args(args, context=context_length(lm.model), default_max_new_tokens=128)
    use_one_thread_for_small_models(lm.model)
    use_template = is_chat_model(lm) if args.format == "auto" else args.format == "chat"
    mmi = None
    if args.mmi:
        if params.greedy:
            raise ConfigError("--mmi needs sampled candidates: set --temperature above 0 (e.g. 0.8)")
        mmi = load_for_generation(args.mmi, device=lm.model.device)
        if mmi.meta and mmi.task != "mmi":
            print(
                f"warning: {args.mmi} was trained with task '{mmi.task}', not 'mmi' (owngpt train --task mmi); "
                "its scores may mean little",
                file=sys.stderr,
            )
    # generate() drops an all-ones attention mask, and GPT-2 then warns "passing an attention_mask" whenever a
    # sampled token equals the pad id: a false alarm on the terminal (our batches always carry their mask). Set
    # after loading: with this logger above WARNING, from_pretrained logs a tensor-parallel report instead.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    settings = ChatSettings(use_template=use_template, mmi=mmi, candidates=args.candidates)
    mode = "chat template" if use_template else "plain text: User:/Bot: lines"
    print(
        f"owngpt chat: {lm.path} ({mode}{', MMI reranking' if mmi else ''}). /help for commands, /exit or Ctrl-D "
        "to quit.",
        file=sys.stderr,
    )
    if not use_template:
        print(
            f"note: this is a plain language model (task '{lm.task}'), not chat-tuned: it continues text. Your line "
            "becomes 'User: ...' in a transcript and it writes the next 'Bot:' line in the style of its training "
            f"text. It reads the last {lm.context_length} tokens at most.",
            file=sys.stderr,
        )
    repl = ChatREPL(lm, params, settings, system=args.system, transcript=args.transcript, debug=args.debug)
    return repl.run()
