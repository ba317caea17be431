"""The `diffusiond` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diffusiond import __version__
from diffusiond.commands import add_client_commands, run_client_command
from diffusiond.errors import ModelLoadError, SettingsError
from diffusiond.memory import bound_kernel_caches
from diffusiond.redaction import redact_text
from diffusiond.settings import OPTIONS, Option, Settings, load_settings


def _environment_help() -> str:
    lines = ["environment variables (a flag wins; a DIFFUSIOND_ name wins over its alias):"]
    for option in OPTIONS:
        if option.env is not None:
            lines.append(f"  {option.env:<32} {option.flag}: {option.help}")
        lines += [f"  {alias:<32} {option.flag}: alias of {option.env}" for alias in option.aliases]
    lines.append(f"  {'HF_HUB_OFFLINE':<32} always forced to 1: nothing is ever downloaded")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusiond",
        description="A local image-generation server with an async, pollable HTTP API.",
    )
    parser.add_argument("--version", action="version", version=f"diffusiond {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. It listens at once and loads the model in the "
        "background; /health answers 503 SERVER_NOT_READY until the model is loaded.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(serve, OPTIONS)
    worker = commands.add_parser(
        "worker",
        help="take generations from a broker's queue (see serve --broker)",
        description="Load the model once and run generations from the queue at --broker, "
        "one at a time, until SIGTERM/SIGINT. Run one worker per GPU; API nodes are "
        "'diffusiond serve --broker' with the same URL.",
    )
    _add_options(worker, [option for option in OPTIONS if option.field in WORKER_FIELDS])
    add_client_commands(commands)
    return parser


# The settings a worker reads; the others belong to API nodes.
WORKER_FIELDS = frozenset(
    {
        "broker",
        "model",
        "model_config",
        "diffusion_model",  # and its companions: the split-component default model
        "vae",
        "clip_l",
        "clip_g",
        "t5xxl",
        "llm",
        "tokenizers",
        "models_dir",  # each worker serves every model (and LoRA) of its own models dir
        "max_loaded_models",
        "loras_dir",
        "device",
        "offload",
        "gguf_weights",
        "backend",
        "home",
        "torch_threads",
        "log_level",
        "log_json",
        "generation_timeout_ms",
        "grace_seconds",
        "broker_heartbeat_s",
        "broker_sweep_s",
    }
)


def _add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for option in options:
        env = f" [env {', '.join(option.names())}]" if option.names() else ""
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.field,
                action="store_const",
                const="true",
                help=f"{option.help}{env}",
            )
        else:
            parser.add_argument(
                option.flag, dest=option.field, metavar="VALUE", help=f"{option.help}{env}"
            )


def serve(settings: Settings) -> int:
    """`diffusiond serve`: with --broker an API node of the queue (the model lives in the
    workers), otherwise the single-process server with the model in it."""
    from diffusiond.logs import configure_logging
    from diffusiond.serving import refuse_unprotected_exposure

    refuse_unprotected_exposure(settings)
    configure_logging(settings.log_level, as_json=settings.log_json)
    if settings.broker is not None:
        from diffusiond.broker.service import serve_broker

        return serve_broker(settings)
    from diffusiond.server import serve as serve_in_process

    return serve_in_process(settings)


def main(argv: Sequence[str] | None = None) -> int:
    bound_kernel_caches()  # before torch builds its first kernel: see memory.py
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        flags = {option.field: getattr(args, option.field) for option in OPTIONS}
        try:
            return serve(load_settings(os.environ, flags))
        except (SettingsError, ModelLoadError) as exc:
            print(f"diffusiond: cannot start: {redact_text(exc.message)}", file=sys.stderr)
            return 2
    if args.command == "worker":
        flags = {option.field: getattr(args, option.field, None) for option in OPTIONS}
        try:
            settings = load_settings(os.environ, flags)
            from diffusiond.broker.worker import run_worker
            from diffusiond.logs import configure_logging

            configure_logging(settings.log_level, as_json=settings.log_json)
            return run_worker(settings)
        except (SettingsError, ModelLoadError) as exc:
            print(f"diffusiond: cannot start: {redact_text(exc.message)}", file=sys.stderr)
            return 2
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
