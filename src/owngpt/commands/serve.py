"""`owngpt serve CKPT`: an OpenAI-compatible HTTP server with a web chat page (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from owngpt.commands.flags import add_device_argument
from owngpt.decode_kernels import prefer_huge_pages

HELP = "OpenAI-compatible HTTP server with a web chat page"
DESCRIPTION = """\
Serve a checkpoint over HTTP: the OpenAI API (GET /v1/models, POST /v1/completions, POST /v1/chat/completions with
streaming; POST /v1/classify for classification checkpoints), GET /health, the schema at /openapi.json, and a chat
page at http://HOST:PORT/ . Any OpenAI client works: base_url="http://127.0.0.1:8000/v1", api_key=KEY.

Requests arriving together are generated in one batch (--max-batch-size); a full queue answers 429.

examples:
  owngpt serve runs/chat/checkpoints/last --api-key s3cret
  OWNGPT_API_KEY=s3cret owngpt serve runs/tiny/checkpoints/last --port 8080
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ckpt", metavar="CKPT", help="checkpoint dir (config.json + model.safetensors), e.g. RUN/checkpoints/last"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine "
        "only; 0.0.0.0 = every interface, which needs --api-key)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' (default: "
        "the OWNGPT_API_KEY environment variable; without either, anyone who can connect may use it)",
    )
    p.add_argument(
        "--insecure-no-key", action="store_true", help="allow listening on a non-loopback --host without an API key"
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="model id reported by /v1/models and expected in requests "
        "(default: the checkpoint's run and dir name, e.g. 'myrun/last')",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="most sequences generated together in one batch (default 16; 1 = one at a time)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most sequences waiting for a batch; more are refused with 429 (default 256)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="with --scheduler dynamic: longest a queued request waits for the clients of the previous batch to "
        "send their next requests and share its batch (default 20 ms; a lone client never waits)",
    )
    p.add_argument(
        "--scheduler",
        choices=("continuous", "dynamic"),
        default="continuous",
        help="continuous (default): a request joins the running batch at its next decode step; dynamic: a batch "
        "runs to its end before the next one starts (the older scheduler, kept for comparison)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core; 1 is faster for tiny models or a busy machine)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    add_device_argument(p)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    prefer_huge_pages()  # weights on 2 MiB pages: set before torch's first allocation
    from owngpt.errors import ConfigError, require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    import uvicorn

    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be an integer >= 1")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms {args.batch_wait_ms}: must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be between 0 and 65535")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be an integer >= 1")
    api_key = args.api_key or os.environ.get("OWNGPT_API_KEY") or None
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise ConfigError(  # a blank key protects nothing; stray spaces never match what a client sends
            "--api-key / OWNGPT_API_KEY: a key must not be blank or start or end with spaces (not shown here); "
            "make one with `python -c 'import secrets; print(secrets.token_urlsafe())'`"
        )
    if api_key is None:
        if not _is_loopback(args.host) and not args.insecure_no_key:
            raise ConfigError(
                f"--host {args.host} would let anyone on the network use the model: set --api-key "
                "KEY (or OWNGPT_API_KEY), or pass --insecure-no-key if you really mean it"
            )
        print(
            "warning: no API key (--api-key or OWNGPT_API_KEY): anyone who can reach this port can use the model",
            file=sys.stderr,
        )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    _check_port_free(args.host, args.port)  # before the model loads, and as an error line, not uvicorn's log
    from owngpt.device import inference_device
    from owngpt.serve.app import create_app

    app = create_app(
        args.ckpt,
        api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        model_name=args.model_name,
        continuous=args.scheduler == "continuous",
        device=inference_device(args.device),
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"owngpt serve: {args.ckpt} at http://{shown}:{args.port}/ (API base http://{shown}:{args.port}/v1)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Refuse a --port another process listens on. uvicorn found out only after the model had loaded and then
    logged `ERROR: [Errno 98] ... address already in use` and exited with status 3. (A process that takes the
    port between this check and uvicorn's bind still meets uvicorn's message.)"""
    import errno
    import socket

    from owngpt.errors import ConfigError

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # a host that does not resolve: uvicorn reports it
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"--port {port}: {host}:{port} is already in use (another `owngpt serve`?); stop that process "
                    f"or choose another --port, e.g. --port {port + 1}"
                ) from None
