"""The `diffusiond` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diffusiond import __version__
from diffusiond.commands import add_client_commands, run_client_command
from diffusiond.errors import ModelLoadError, SettingsError
from diffusiond.settings import OPTIONS, load_settings


def _environment_help() -> str:
    lines = ["environment variables (a flag of the same meaning wins):"]
    for option in OPTIONS:
        if option.env is not None:
            lines.append(f"  {option.env:<28} {option.flag}: {option.help}")
    lines.append("  HF_HUB_OFFLINE               always forced to 1: nothing is ever downloaded")
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
    for option in OPTIONS:
        env = f" [env {option.env}]" if option.env else ""
        if option.switch:
            serve.add_argument(
                option.flag,
                dest=option.field,
                action="store_const",
                const="true",
                help=f"{option.help}{env}",
            )
        else:
            serve.add_argument(
                option.flag, dest=option.field, metavar="VALUE", help=f"{option.help}{env}"
            )
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        flags = {option.field: getattr(args, option.field) for option in OPTIONS}
        try:
            settings = load_settings(os.environ, flags)
            from diffusiond.server import serve

            return serve(settings)
        except (SettingsError, ModelLoadError) as exc:
            print(f"diffusiond: cannot start: {exc.message}", file=sys.stderr)
            return 2
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
