"""``tritium serve``: the OpenAI-compatible server over a checkpoint (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint folder: config.json + model.safetensors + tokenizer.model (a run's final/)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--model-name", default="tritium", help="model id clients send and /v1/models lists")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 routes (visible in `ps`: prefer "
                          "$TRITIUM_API_KEY or --api-key-file)")
    key.add_argument("--api-key-file", default=None, metavar="FILE",
                     help="read the API key from FILE (first line, surrounding whitespace stripped)")
    guard = parser.add_argument_group("limits and guardrails")
    guard.add_argument("--policy", metavar="FILE", default=None, help="guardrail policy (YAML or JSON)")
    guard.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    guard.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait for a batch slot; beyond it clients get 429 + Retry-After")
    guard.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 above)")
    guard.add_argument("--shutdown-grace", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on shutdown before being aborted")
    rag = parser.add_argument_group("retrieval")
    rag.add_argument("--docs", metavar="DIR", default=None,
                     help="index the .txt/.md files in DIR (BM25) and inject the top-k chunks into prompts")
    rag.add_argument("--top-k-docs", type=int, default=3, help="chunks injected per request (default 3)")
    runtime = parser.add_argument_group("engine")
    from tritium.serve.cli_generate import add_model_arguments, add_speculative_arguments

    add_model_arguments(runtime)
    runtime.add_argument("--max-num-seqs", type=int, default=32, help="requests batched together at most")
    runtime.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    runtime.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized by memory)")
    runtime.add_argument("--no-prefix-caching", action="store_true",
                         help="recompute every prompt instead of reusing the KV blocks of cached prefixes")
    runtime.add_argument("--log-level", default="info", help="uvicorn log level")
    add_speculative_arguments(parser)  # --speculative ngram | draft --draft-checkpoint DIR


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else --api-key-file, else None (ServeConfig.from_env then reads $TRITIUM_API_KEY)."""
    if args.api_key is not None:
        return args.api_key
    path = getattr(args, "api_key_file", None)
    if path is None:
        return None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:  # "~/..." also when the shell left it
            key = f.readline().strip()
    except OSError as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
    if not key:
        raise ValueError(f"--api-key-file {path}: the file is empty")
    return key


def build_app(args: argparse.Namespace):
    """(app, config) for parsed ``tritium serve`` arguments (loads the checkpoint)."""
    from tritium.serve.api import ServeConfig, create_app
    from tritium.serve.cli_generate import load_model_and_tokenizer, speculative_from_args
    from tritium.serve.engine import LLMEngine

    config = ServeConfig.from_env(model_name=args.model_name, api_key=read_api_key(args),
                                  max_tokens_cap=args.max_tokens_cap,
                                  max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                                  policy_file=args.policy, docs_dir=args.docs, retrieval_top_k=args.top_k_docs,
                                  shutdown_grace_s=args.shutdown_grace)
    model, tokenizer = load_model_and_tokenizer(args)  # --tensor-parallel N: rank 0's view of N ranks
    try:
        engine = LLMEngine(model, tokenizer, block_size=args.block_size, num_blocks=args.num_blocks,
                           max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                           speculative=speculative_from_args(args, model))
        app = create_app(engine, tokenizer, config)
    except BaseException:
        if hasattr(model, "close"):
            model.close()
        raise
    app.state.tensor_parallel_model = model if hasattr(model, "close") else None
    return app, config


def make_server(app, host: str, port: int, grace_s: float, log_level: str = "info", on_shutdown=None):
    """A uvicorn Server that drains before it closes.

    The first SIGTERM/SIGINT flips the app to draining while the socket stays open: new requests get a
    503 JSON error, requests in flight get ``grace_s`` to finish, the rest end with a 503 (an SSE error
    event then ``data: [DONE]`` on streams), and only then does uvicorn close.  A second signal exits at
    once.  A fatal engine error makes the server exit too (``run`` then returns 1).  ``on_shutdown`` runs
    after the app's shutdown (engine stopped), before uvicorn re-raises the signal that stopped it.
    """
    import asyncio

    import uvicorn

    srv = app.state.server

    class DrainingServer(uvicorn.Server):
        drain_task = None

        def handle_exit(self, sig, frame) -> None:
            loop = srv.loop
            if self.drain_task is None and loop is not None and not self.should_exit:
                srv.draining = True
                # Signal handlers run between bytecodes of the loop's thread: schedule, don't await.
                loop.call_soon_threadsafe(self._start_drain, sig, frame)
                self.drain_task = True
                return
            super().handle_exit(sig, frame)

        def _start_drain(self, sig, frame) -> None:
            self.drain_task = asyncio.ensure_future(self._drain_then_exit(sig, frame))

        async def _drain_then_exit(self, sig, frame) -> None:
            try:
                await srv.drain(grace_s)
            finally:
                super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config)
    srv.exit_hook = lambda: setattr(server, "should_exit", True)
    return server


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    app, config = build_app(args)
    if not is_loopback(args.host) and config.api_key is None:
        print(f"tritium serve: warning: binding {args.host} without an API key; anyone who can reach this port "
              f"can use the model (set --api-key or $TRITIUM_API_KEY)", file=sys.stderr)
    print(f"tritium serve: {config.model_name} on http://{args.host}:{args.port}/v1 "
          f"(api key {'required' if config.api_key else 'off'}, pid {os.getpid()})", file=sys.stderr)
    tp_model = app.state.tensor_parallel_model  # the engine stops first, then the other ranks
    try:
        make_server(app, args.host, args.port, config.shutdown_grace_s, args.log_level,
                    on_shutdown=tp_model.close if tp_model is not None else None).run()
    finally:
        if tp_model is not None:
            tp_model.close()
    if app.state.server.fatal_error is not None:
        print(f"tritium serve: the engine failed, exiting so a supervisor can restart it: "
              f"{app.state.server.fatal_error}", file=sys.stderr)
        return 1
    return 0
