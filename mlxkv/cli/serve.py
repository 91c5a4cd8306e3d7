"""mlxkv serve: an OpenAI-compatible server on the batching engine, with quantized KV caches."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from mlxkv.cli.common import (
    add_distributed_arguments, add_model_argument, count_arg, load_model, note, size_arg, tokens_arg,
)
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog, request_from_args
from mlxkv.config.request import AUTO
from mlxkv.errors import UserError

DEFAULT_PORT = 8080  # as mlx_lm.server
DEFAULT_MAX_BATCH = 32  # as mlx_lm.server's --decode-concurrency
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_TOKENS = 512  # as mlx_lm.server


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server: many conversations at once on quantized KV caches",
        description=textwrap.fill(
            "Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. Requests "
            "are decoded together (continuous batching); a request is admitted when its KV cache "
            "(prompt + max_tokens) fits --kv-memory, waits while it does not fit yet (up to "
            "--max-queue waiting, then 429), and is refused with 400 when it never can.", 80),
        epilog="Example: mlxkv serve --kv-bits 4 --kv-memory 4GB --port 8080\n"
               "         curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' "
               "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n\n" + kv_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    http = p.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    http.add_argument("--served-model-name", metavar="NAME",
                      help="the model id clients send and /v1/models lists (default: the model file or repo name)")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                      help="info (default) logs a line per request; warning only problems")
    engine = p.add_argument_group("batching and memory")
    engine.add_argument("--max-batch", type=count_arg("--max-batch"), default=DEFAULT_MAX_BATCH,
                        help=f"sequences decoded together at most (default {DEFAULT_MAX_BATCH})")
    engine.add_argument("--kv-memory", metavar="SIZE", type=size_arg,
                        help="KV cache budget for the sequences being decoded, e.g. 4GB (default: this machine's "
                             "recommended working set less the weights and the prefix cache)")
    engine.add_argument("--max-queue", type=count_arg("--max-queue", 0), default=DEFAULT_MAX_QUEUE,
                        help=f"requests waiting for room before new ones get 429 (default {DEFAULT_MAX_QUEUE})")
    engine.add_argument("--prompt-cache-bytes", metavar="SIZE", type=_size_or_zero,
                        help="budget of the prefix cache: finished conversations' KV caches kept to reuse for the "
                             "next turn, least recently used out first (default: a tenth of the memory left after "
                             "the weights; 0 turns it off)")
    engine.add_argument("--prefill-step-size", type=tokens_arg, default=DEFAULT_PREFILL_STEP_SIZE,
                        help=f"prompt tokens per forward pass (default {DEFAULT_PREFILL_STEP_SIZE}, as mlx-lm)")
    sampling = p.add_argument_group("defaults for requests that leave a field out")
    sampling.add_argument("--max-tokens", type=tokens_arg, default=DEFAULT_MAX_TOKENS,
                          help=f"tokens to generate (default {DEFAULT_MAX_TOKENS}, cut to what the context leaves)")
    sampling.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    add_kv_arguments(p, auto=False)
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def _port(text: str) -> int:
    value = count_arg("--port", 0)(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be in 0-65535, got {value}")
    return value


def _size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else size_arg(text)


def _require_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"mlxkv serve needs the serve extra ({e.name} is missing): pip install 'mlxkv[serve]'") from None


def run(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from mlxkv.cli.common import sampling_from_args
    from mlxkv.engine import Engine
    from mlxkv.server import Defaults, Server, bind, create_app
    from mlxkv.server.budget import server_budgets
    from mlxkv.units import format_bytes

    if args.kv_bits == AUTO:
        raise UserError("--kv-bits auto picks a configuration for one prompt; for a server pass --kv-bits N "
                        "or --kv-config SPEC")
    from mlxkv import distributed

    kv_request = request_from_args(args)  # everything that can be checked is checked before loading
    args.seed = None
    defaults = sampling_from_args(args)  # the same rules (and messages) as generate's flags
    distributed.start()  # under mlx.launch only rank 0 listens
    sock = bind(args.host, args.port) if distributed.is_main() else None

    model, tokenizer, model_id = load_model(args)
    sharding = distributed.setup(model, args)
    config = kv_request.resolve(model, note=note)
    if sharding.active:
        distributed.check_config(sharding, config)
    budgets = distributed.agreed_budgets(server_budgets(model, args.kv_memory, args.prompt_cache_bytes))
    settings = dict(max_batch=args.max_batch, kv_budget=budgets.kv, max_queue=args.max_queue,
                    prefix_cache_bytes=budgets.prefix, prefill_step_size=args.prefill_step_size)
    if sharding.active:
        from mlxkv.engine.lockstep import LockstepEngine

        engine = LockstepEngine(model, tokenizer, config, group=sharding.group, **settings)
        note(sharding.describe())
        if not sharding.main:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 ends them all
            engine.follow()  # steps as rank 0 announces, until it stops
            return 0
    else:
        engine = Engine(model, tokenizer, config, **settings)
    served = served_model(args.served_model_name, model_id, engine.context_limit)
    app = create_app(engine, served, Defaults(defaults.max_tokens, defaults.temperature, defaults.top_p))
    server = Server(app, sock, log_level="warning" if args.log_level == "info" else args.log_level)
    _log_to_stderr(args.log_level)

    one = engine.reservation(2048)
    note(f"KV cache: {config.describe()}; {budgets.note}")
    note(f"admission: a 2,048-token conversation reserves {format_bytes(one)}, so about {budgets.kv // one:,} "
         f"fit at once (batch of at most {args.max_batch}, {'batched' if engine.rows.shares_slots else 'one by one'})")
    host, port = server.address
    note(f"serving '{served.name}' on http://{_url_host(host)}:{port}/v1 (Ctrl-C to stop)")
    server.serve_forever()
    note("stopped")
    return 0


def served_model(name: str | None, model_id: str, context: int | None):
    """The id clients send: --served-model-name, else the model file's or repo's name; the
    full path or repo id is accepted too."""
    from pathlib import Path

    from mlxkv.server import ServedModel

    short = Path(model_id).name if Path(model_id).expanduser().exists() else model_id
    return ServedModel(name or short, tuple({short, model_id} - {name or short}), context)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _log_to_stderr(level: str) -> None:
    """The server's per-request lines go to stderr like the other notes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mlxkv] %(message)s"))
    log = logging.getLogger("mlxkv.server")
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
