"""`ctc-drafter serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one loaded engine."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys

from .common import add_decoding_args, add_model_args, load_drafter


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (chat and completions)")
    add_model_args(p)
    add_decoding_args(p)  # here: defaults for requests that leave max_tokens / temperature / ... out
    p.add_argument("--baseline", action="store_true", help="decode without speculation (for comparison)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CTC_DRAFTER_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $CTC_DRAFTER_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the base model's name)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the one being decoded; more get 429")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _settings(args, model_name: str):
    from ..serving.settings import ServeSettings

    return ServeSettings(model_name=args.served_model_name or model_name, speculative=not args.baseline,
                         max_queue=args.max_queue, api_key=args.api_key, template=args.template,
                         max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed)


def _check_args(args) -> None:
    from ..errors import CTCDrafterError

    if not 0 <= args.port <= 65535:
        raise CTCDrafterError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 1:
        raise CTCDrafterError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_new_tokens < 1:
        raise CTCDrafterError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    import uvicorn

    from ..serving.app import create_app

    _check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine, _ = load_drafter(args, None if args.baseline else args.draft_model)  # lives as long as the server
    settings = _settings(args, engine.base.name)
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"ctc-drafter: warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    sock = _bind(args.host, args.port)
    mode = "baseline (no speculation)" if args.baseline else engine.label()
    host, port = sock.getsockname()[:2]
    print(f"ctc-drafter: serving {settings.model_name!r}, {mode}, on http://{_url_host(host)}:{port}/v1 "
          "(Ctrl-C finishes the requests in flight, then exits)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level=args.log_level,
                                           timeout_keep_alive=5))
    _serve_until_signalled(server, sock)
    print("ctc-drafter: drained, bye", file=sys.stderr)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a one-line error and --port 0 a free port."""
    from ..errors import CTCDrafterError

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except OSError as e:
        raise CTCDrafterError(f"cannot listen on {host}:{port}: {e.strerror or e}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _serve_until_signalled(server, sock: socket.socket) -> None:
    """Run uvicorn; on Ctrl-C or SIGTERM it stops accepting, finishes open responses, then the app's lifespan
    drains the queue. uvicorn re-raises the signal afterwards (to the handler in place before it started);
    no-op handlers here turn that into a normal return, so a drained server exits 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
