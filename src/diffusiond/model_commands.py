"""`diffusiond models`: the models a server can draw with (GET /v1/models)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from diffusiond.client import Client


def add_models_command(commands: Any, add_server_flag: Any) -> None:
    models = commands.add_parser("models", help="the models the server can draw with")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    add_server_flag(models)


def list_models(args: argparse.Namespace) -> int:
    with Client(args.server, api_key=args.api_key) as client:
        models = client.models()
    if args.json:
        sys.stdout.write(json.dumps([asdict(model) for model in models], indent=2) + "\n")
        return 0
    table = Table("id", "architecture", "format", "loaded", "default", box=None)
    for model in models:
        table.add_row(
            model.id,
            model.architecture,
            model.format,
            "yes" if model.loaded else "",
            "yes" if model.default else "",
        )
    Console(highlight=False, width=120).print(table)
    return 0
