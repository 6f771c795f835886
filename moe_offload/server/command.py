"""`moe-offload serve`: load one model, bind the socket, run uvicorn until Ctrl-C.

The socket is bound here, before uvicorn starts, so that a port in use or a bad host is one line (exit 2) rather
than uvicorn's log and exit 1; tests pass a socket of their own on port 0 to `run_server`. The server listens on
127.0.0.1 unless --host says otherwise; `--api-key` (or MOE_OFFLOAD_API_KEY) makes /v1 and /metrics demand
`Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any, Callable

from ..errors import MoeOffloadError

API_KEY_ENV = "MOE_OFFLOAD_API_KEY"
DEFAULT_QUEUE_SIZE = 16
# when a request sets none: the static KV cache is sized by prompt + max_tokens. Here, not in prepare.py, so that
# building the CLI's parser imports nothing of the [serve] extra (pydantic, fastapi): every other command runs
# without it
DEFAULT_MAX_TOKENS = 512


def add_serve_command(subparsers, add_model_flags: Callable[[argparse.ArgumentParser], None],
                      properties: Callable[[argparse.Namespace], dict[str, Any]]):
    """Register `serve` with the model flags every loading command has (`add_model_flags`); `properties(args)`
    turns them into LLMPipeline keywords."""
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat page at /)")
    add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help=f"demand Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    serve.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                       help=f"requests that may wait while one generates; more get 429 (default {DEFAULT_QUEUE_SIZE})")
    serve.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"tokens generated when a request sets no max_tokens (default {DEFAULT_MAX_TOKENS})")
    serve.add_argument("--model-name", default=None, help="the model's id in the API (default: the folder's name)")
    serve.set_defaults(run=lambda args: _cmd_serve(args, properties(args)))
    return serve


def _cmd_serve(args: argparse.Namespace, props: dict[str, Any]) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MoeOffloadError(f"serve needs {err.name}: pip install 'moe-offload[serve]'") from None
    if args.queue_size < 1:
        raise MoeOffloadError("--queue-size must be at least 1")
    if args.max_tokens < 1:
        raise MoeOffloadError("--max-tokens must be at least 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise MoeOffloadError("--api-key is empty")
    sock = bind(args.host, args.port)  # before the load: a busy port should not cost a model load to find out
    from ..pipeline import LLMPipeline

    pipe = LLMPipeline(args.model, args.device, config=args.load_config, progress=sys.stderr.isatty(),
                       require_tokenizer=True, **props)
    for choice in pipe.choices:
        print(f"moe-offload: {choice.line()}", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "::1") and api_key is None:
        print(f"moe-offload: warning: listening on {host} without an API key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)
    print(f"moe-offload: serving on http://{_url_host(host)}:{port}/ (chat page), API at /v1", file=sys.stderr)
    try:
        run_server(pipe, sock, api_key=api_key, queue_size=args.queue_size, default_max_tokens=args.max_tokens,
                   name=args.model_name)
    finally:
        pipe.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line error."""
    if not 0 <= port <= 65535:
        raise MoeOffloadError(f"--port {port} is not a port number (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise MoeOffloadError(f"cannot listen on {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise MoeOffloadError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.setblocking(False)
    return sock


def build_service(pipe, api_key: str | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                  default_max_tokens: int | None = None, name: str | None = None):
    """The app's parts for a loaded pipeline; the worker is started and must be closed by the caller."""
    from .app import Service
    from .metrics import Metrics
    from .prepare import Served
    from .worker import GenerationWorker

    served = Served.from_pipeline(pipe, name, default_max_tokens or DEFAULT_MAX_TOKENS)
    metrics = Metrics()
    worker = GenerationWorker(pipe, served, metrics, queue_size)
    worker.start()
    return Service(served, worker, metrics, api_key, created=int(time.time()))


def make_server(pipe, log_level: str = "info", **options: Any):
    """(uvicorn.Server, Service) for a loaded pipeline; `server.run(sockets=[sock])` serves until
    `server.should_exit` is set; then close the service's worker. `options`: build_service's."""
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            """Ctrl-C: end the running generation too, or uvicorn would wait for its stream. A signal handler runs
            between two steps of the loop (it may hold a lock): the work is handed to the loop."""
            if self.loop is not None:
                self.loop.call_soon_threadsafe(service.worker.shutdown)
            super().handle_exit(sig, frame)

    service = build_service(pipe, **options)
    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=5)
    return Server(config), service


def run_server(pipe, sock: socket.socket, **options: Any) -> None:
    server, service = make_server(pipe, **options)
    try:
        server.run(sockets=[sock])
    finally:
        service.worker.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
