"""Shared pieces of the server tests: a tiny tokenizer + random model, and a real uvicorn server in a thread.

Not a test module (no ``test_`` prefix); the serve tests import it by name (pytest puts this folder on
sys.path).  The tokenizer is trained once per process on a small slice of the embedded corpus.
"""
from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

MAX_SEQ_LEN = 160  # small context, so "prompt longer than the context" is cheap to build


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from tritium.model.tokenizer import train_tokenizer

    return train_tokenizer(None, vocab_size=400, max_bytes=150_000, num_threads=1)


@functools.lru_cache(maxsize=1)
def tiny_model() -> Any:
    """A random 2-layer tiny Llama (fixed seed): outputs are noise, but exactly reproducible."""
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    tok = tiny_tokenizer()
    cfg = ModelConfig.from_name("tiny", num_layers=2, vocab_size=tok.vocab_size, max_seq_len=MAX_SEQ_LEN,
                                backend="torch")
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def make_engine(max_num_seqs: int = 8, num_blocks: int | None = None) -> Any:
    from tritium.serve.engine import LLMEngine

    return LLMEngine(tiny_model(), tiny_tokenizer(), block_size=16, num_blocks=num_blocks,
                     max_num_seqs=max_num_seqs, max_prefill_tokens=256)


class ServerThread:
    """uvicorn on a pre-bound free 127.0.0.1 port, in a background thread.

    ``drain_grace_s`` builds the server the way ``tritium serve`` does (``cli_serve.make_server``: the
    first shutdown signal drains for that long before closing); ``sigterm()`` then sends it that signal.
    """

    def __init__(self, app: Any, drain_grace_s: float | None = None):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if drain_grace_s is not None:
            from tritium.serve.cli_serve import make_server

            self.server = make_server(app, "127.0.0.1", self.port, drain_grace_s, "warning")
        else:
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
            self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def sigterm(self) -> None:
        """What SIGTERM does to ``tritium serve`` (handle_exit on the server's loop thread)."""
        import signal

        loop = self.app.state.server.loop
        loop.call_soon_threadsafe(self.server.handle_exit, signal.SIGTERM, None)


@contextmanager
def running_server(config: Any = None, *, max_num_seqs: int = 8, num_blocks: int | None = None,
                   engine: Any = None, drain_grace_s: float | None = None) -> Iterator[ServerThread]:
    from tritium.serve.api import ServeConfig, create_app

    engine = engine if engine is not None else make_engine(max_num_seqs, num_blocks)
    app = create_app(engine, tiny_tokenizer(), config or ServeConfig())
    server = ServerThread(app, drain_grace_s).start()
    try:
        yield server
    finally:
        server.stop()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0
