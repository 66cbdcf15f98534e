"""`owngpt prepare`: raw files -> cleaned, split, tokenized data dir (the work is in owngpt.data.prepare)."""

from __future__ import annotations

import argparse

HELP = "clean raw text/dialogues/labelled data and tokenize it into a data dir"
DESCRIPTION = """\
Clean raw files, split them into train/validation by document and tokenize them into a data dir that
`owngpt train` reads. A report of what each cleaning rule changed or dropped is printed and saved (report.json).

Formats, by extension or --format:
  .txt .md       plain text: a file is a document, or documents are split by --doc-sep
  .jsonl .json   {"text"} (lm), {"text", "label"} (classify), or a conversation (chat): {"messages": [...]},
                 ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input", "output"}
  .csv .tsv      a header row; text and label columns (--text-column, --label-column)
  chitchat       GPT2-chitchat dialogue text: one utterance a line, dialogues separated by a blank line
                 (plain .txt files are read this way with --task chat)
The task (lm, chat, classify) is inferred from the data when you leave out --task.

Examples:
  owngpt prepare tinyshakespeare.txt --out data/shakespeare --tokenizer char
  owngpt prepare tang300.txt song100.txt --doc-sep % --out data/poems --vocab-size 2000
  owngpt prepare dialogs.jsonl --task chat --out data/chat
  owngpt prepare reviews.csv --task classify --labels negative,positive --out data/sentiment
  owngpt prepare WhatsApp.txt --from whatsapp --me "Zhang San" --out data/me
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="input files or folders (folders are searched recursively for known extensions)",
    )
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="the data dir to create")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a data dir owngpt made (never another folder; the old one stays whole until "
        "the new one is complete)",
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--task",
        choices=["lm", "chat", "classify"],
        help="what the data is for (default: inferred: "
        "messages/conversations/instruction fields -> chat, a label field or column -> classify, else lm)",
    )
    g.add_argument(
        "--format",
        choices=["txt", "jsonl", "json", "csv", "tsv", "chitchat"],
        help="read every input in this format (default: by file extension)",
    )
    g.add_argument(
        "--doc-sep",
        default="file",
        metavar="SEP",
        help="plain text: what separates documents: 'file' (a file is one document; a single document "
        "is split by position), 'blank' (blank lines), 'line' (one a line), or a separator line "
        "such as %% (fortune files) (default: file)",
    )
    g.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the inputs, e.g. gbk, gb18030, big5, latin-1 (default: utf-8; a UTF-8 BOM is stripped)",
    )
    g.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    g.add_argument("--label-field", default="label", help="JSON field holding the label (default: label)")
    g.add_argument(
        "--messages-field",
        default="messages",
        help="JSON field holding a conversation's messages "
        "(default: messages; conversations and Alpaca "
        "fields are recognised too)",
    )
    g.add_argument("--text-column", help="CSV/TSV text column (default: text, sentence, content, review, ...)")
    g.add_argument("--label-column", help="CSV/TSV label column (default: label, labels, class, category, ...)")
    g.add_argument(
        "--labels",
        help="classify: the label names in id order, comma-separated (default: the labels "
        "found, integers in numeric order, names alphabetically); others are invalid",
    )
    g = p.add_argument_group("cleaning")
    g.add_argument(
        "--nfkc",
        action="store_true",
        help="NFKC instead of NFC Unicode normalization (folds full-width letters, ligatures... into plain forms)",
    )
    g.add_argument("--strip-html", action="store_true", help="remove HTML tags and decode entities")
    g.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate documents")
    g.add_argument(
        "--near-dup",
        action="store_true",
        help="also drop near-duplicates (MinHash LSH over character 5-grams; needs datasketch)",
    )
    g.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="estimated Jaccard similarity above which documents are near-duplicates (default: 0.8)",
    )
    g.add_argument(
        "--min-chars",
        type=int,
        default=1,
        help="drop documents shorter than this, in characters (chat: a conversation's messages together) (default: 1)",
    )
    g.add_argument("--max-chars", type=int, help="drop documents longer than this (default: no limit)")
    g.add_argument(
        "--skip-invalid",
        action="store_true",
        help="count and skip bad records (malformed lines, "
        "missing fields, undecodable bytes) instead of "
        "stopping at the first",
    )
    g.add_argument(
        "--max-invalid-fraction",
        type=float,
        default=0.1,
        help="with --skip-invalid, still fail when more than this fraction of records is bad (default: 0.1)",
    )
    g = p.add_argument_group("split")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of documents for validation (at least one when there are two or more) (default: 0.1)",
    )
    g.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split (default: 1337)")
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="KIND|PATH",
        help="bpe (byte-level BPE trained on the train split), char (one id per character, byte "
        "fallback), gpt2 (GPT-2's BPE, bundled), gpt2:DIR (vocab.json + merges.txt in DIR), or a "
        "local Hugging Face tokenizer or model dir (default: bpe)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        help="bpe vocabulary size (default: about one entry per 50 characters of training text, between 512 and 8000)",
    )
    g.add_argument("--gpt2-vocab", metavar="vocab.json", help="GPT-2 vocab.json (with --tokenizer gpt2)")
    g.add_argument("--gpt2-merges", metavar="merges.txt", help="GPT-2 merges.txt (with --tokenizer gpt2)")
    g = p.add_argument_group("resources")
    g.add_argument(
        "--max-memory-mb",
        type=int,
        default=256,
        help="memory budget for tokenization chunks; the corpus itself is streamed (default: 256)",
    )
    g.add_argument("--quiet", action="store_true", help="do not print the report")
    g = p.add_argument_group("chat exports (your own chat history)")
    g.add_argument(
        "--from",
        dest="source_format",
        choices=["whatsapp", "telegram", "wechat", "csv"],
        help="read chat exports: WhatsApp .txt, Telegram result.json, WeChat CSV (MemoTrace/WeChatMsg), "
        "or a generic CSV/JSONL of time, sender, text",
    )
    g.add_argument("--me", help="your name as it appears in the export: your messages become assistant turns")
    g.add_argument(
        "--session-gap",
        default="2h",
        help="a new conversation starts after this silence (e.g. 30m, 2h, 1d) (default: 2h)",
    )
    g.add_argument(
        "--pseudonymize",
        action="store_true",
        help="replace other people's names by stable pseudonyms, the export file names by input-1.txt, ... and "
        "--me by a placeholder in meta.json",
    )
    g.add_argument(
        "--keep-pii",
        action="store_true",
        help="do NOT redact phone numbers, e-mails, URLs, ID, passport, IBAN, card and CVV numbers, WeChat/QQ IDs and "
        "postal addresses (redaction is on by default)",
    )
    g.add_argument(
        "--region",
        default="CN",
        help="phone numbers written without a country code are read as this region's (a two-letter code: CN, US, "
        "GB, FR, DE, JP...); numbers written with +CC or 00CC are found for every region (default: CN)",
    )
    g.add_argument("--time-column", help="--from csv: the column with the time")
    g.add_argument("--sender-column", help="--from csv: the column with the sender")
    g.add_argument("--content-column", help="--from csv: the column with the message text")


def config_from_args(args: argparse.Namespace):
    """The PrepareConfig for parsed flags."""
    from owngpt.data.prepare import PrepareConfig

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    return PrepareConfig(
        sources=list(args.sources),
        out=args.out,
        overwrite=args.overwrite,
        task=args.task,
        format=args.format,
        doc_sep=args.doc_sep,
        encoding=args.encoding,
        text_field=args.text_field,
        label_field=args.label_field,
        messages_field=args.messages_field,
        text_column=args.text_column,
        label_column=args.label_column,
        labels=labels,
        nfkc=args.nfkc,
        strip_html=args.strip_html,
        dedup=args.dedup,
        near_dup=args.near_dup,
        near_dup_threshold=args.near_dup_threshold,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        skip_invalid=args.skip_invalid,
        max_invalid_fraction=args.max_invalid_fraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        gpt2_vocab=args.gpt2_vocab,
        gpt2_merges=args.gpt2_merges,
        max_memory_mb=args.max_memory_mb,
        quiet=args.quiet,
        source_format=args.source_format,
        me=args.me,
        session_gap=args.session_gap,
        pseudonymize=args.pseudonymize,
        keep_pii=args.keep_pii,
        region=args.region,
        time_column=args.time_column,
        sender_column=args.sender_column,
        content_column=args.content_column,
    )


def run(args: argparse.Namespace) -> int:
    from owngpt.data.prepare import prepare

    result = prepare(config_from_args(args))
    if not args.quiet:
        print(result.report_text)
        m = result.meta
        print(
            f"wrote {result.out} (task {m['task']}, tokenizer {m['tokenizer']['kind']}, "
            f"vocab {m['tokenizer']['vocab_size']:,}); report: {result.out / 'report.json'}"
        )
    return 0
