"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..cli_args import add_device, add_ignore_fingerprint


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve a base model and many LoRA adapters (continuous batching, one adapter per row).",
    )
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME (repeatable)")  # fmt: skip
    p.add_argument("--adapter-root", metavar="DIR",
                   help="allow POST /v1/adapters to load adapters from under DIR (off without it)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-adapters", type=int, default=8, metavar="N",
                   help="adapters kept loaded at once; least recently used ones are unloaded beyond it")  # fmt: skip
    p.add_argument("--adapter-cache-mb", type=float, default=1024, metavar="MB",
                   help="CPU cache of adapter files, so unloaded adapters reload without the disk (0: off)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=8, metavar="MB",
                   help="largest request body accepted (413 beyond it)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=10, metavar="S",
                   help="on SIGTERM / Ctrl-C, seconds to let running requests finish before cancelling them")  # fmt: skip
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--max-tokens-cap", type=int, default=1024, metavar="N",
                   help="largest max_tokens a request may ask for")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, metavar="N", help="most requests decoded together")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled between two decode steps (longer prompts go in chunks)")  # fmt: skip
    p.add_argument("--max-len", type=int, metavar="N",
                   help="longest prompt + completion (default: the model's max_position_embeddings)")  # fmt: skip
    p.add_argument("--model-name", help="the base model's name in requests (default: from --model)")
    p.add_argument("--dtype", help="parameter dtype, e.g. bf16 (default: the checkpoint's)")
    add_device(p)
    add_ignore_fingerprint(p)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--native-kernel", choices=["auto", "on", "off"], default="auto",
                   help="on a CPU, lorakit's C++ kernel for mixed-adapter decode (built once per machine, "
                        "~1 min; auto: the eager path if it cannot be built; on: fail then)")  # fmt: skip
    p.add_argument("--log-level", default="info", help="uvicorn's log level")
    p.set_defaults(func=run)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=DIR strings -> {name: dir}. Raises ValueError for a malformed or repeated entry."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def base_name_of(model: str) -> str:
    return model if model == "default" else Path(model).expanduser().name.removesuffix(".gguf") or model


def build(args: argparse.Namespace, start_engine: bool = True):
    """(app, engine) from parsed arguments: the model loaded and every --adapter loaded once (validated).
    start_engine: whether the app starts the engine's thread (`run` drives the engine on the main thread)."""
    import torch

    from lorakit.models import load_model

    from .app import create_app
    from .engine import Engine
    from .registry import AdapterRegistry

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_adapters < 1:
        raise ValueError(f"--max-adapters {args.max_adapters}: expected at least 1")
    for flag, value in (("--adapter-cache-mb", args.adapter_cache_mb), ("--max-body-mb", args.max_body_mb)):
        if not value >= 0:  # NaN too
            raise ValueError(f"{flag} {value}: expected a number >= 0")
    adapters = parse_adapters(args.adapter)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    load_native_kernel(getattr(args, "native_kernel", "auto"), model)
    base = args.model_name or base_name_of(args.model)
    registry = AdapterRegistry(model, base, root=args.adapter_root, max_loaded=args.max_adapters,
                               cache_bytes=int(args.adapter_cache_mb * 2**20))  # fmt: skip
    registry.ignore_fingerprint = getattr(args, "ignore_fingerprint", False)
    for name, path in adapters.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {name}={path}: no such directory")
        registry.add(name, path)
    engine = Engine(model, tokenizer, registry, max_batch=args.max_batch, max_len=args.max_len,
                    prefill_chunk=args.prefill_chunk)  # fmt: skip
    app = create_app(engine, registry, base, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                     max_body_bytes=int(args.max_body_mb * 2**20), start_engine=start_engine)  # fmt: skip
    return app, engine


def load_native_kernel(mode: str, model) -> None:
    """--native-kernel: load fast/native's kernel for a model on the CPU (building it on a machine's first
    start). Raises RuntimeError in mode "on" when it cannot be; "auto" says why on stderr and goes on."""
    from lorakit.fast import native

    if mode == "off" or next(model.parameters()).device.type != "cpu":
        return
    if not native.built():
        print(f"lorakit serve: building the native CPU kernel into {native.build_dir()} (once per machine, "
              "~1 min; --native-kernel off skips it)", file=sys.stderr, flush=True)  # fmt: skip
    reason = native.load()
    if reason is not None and mode == "on":
        raise RuntimeError(f"--native-kernel on: the kernel could not be built or loaded: {reason}")
    if reason is not None:
        print(f"lorakit serve: native CPU kernel unavailable ({reason}); mixed batches use the eager path",
              file=sys.stderr, flush=True)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("lorakit serve needs fastapi and uvicorn: pip install 'lorakit[serve]'", file=sys.stderr)
        return 1
    app, engine = build(args, start_engine=False)
    # Bounded graceful shutdown: requests still running after it are cancelled (the engine stops with them).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    return serve_on_main_thread(uvicorn.Server(config), engine)


def serve_on_main_thread(server, engine) -> int:
    """Run `server` (a uvicorn.Server) on a thread and `engine`'s loop on this one, the thread that loaded the
    model (why: `Engine.run`), until the server exits; SIGINT / SIGTERM shut the server down as uvicorn
    does (a second one forces it), the engine decoding on meanwhile for the requests it lets finish.
    Returns 0, or 1 when the server did not start (a port in use, say)."""

    def http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot start (it has logged why)
            pass
        finally:
            engine.stop()  # the requests the server left are cancelled; run() below returns

    def on_signal(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    thread = threading.Thread(target=http, name="lorakit-http", daemon=True)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        engine.run(until=lambda: not thread.is_alive())
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        server.should_exit = True
        thread.join()
    return 0 if server.started else 1
