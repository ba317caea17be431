"""The client-side commands of the CLI: generate, status, cancel, list, models."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as ProgressBar
from rich.table import Table

from diffusiond.client import (
    Client,
    ConnectionError,
    DiffusiondClientError,
    GeneratedImage,
    Generation,
    GenerationCancelledError,
    Progress,
    png_input_hashes,
    png_parameters,
    safe_id,
)
from diffusiond.model_commands import add_models_command, list_models

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True, highlight=False)


def parse_size(text: str) -> tuple[int, int]:
    """'768x512' -> (768, 512)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size must look like 768x512, got {text!r}")
    return int(width), int(height)


def parse_lora(text: str) -> tuple[str, float]:
    """'detail:0.8' -> ("detail", 0.8); a bare name has weight 1."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora must look like name:0.8, got {text!r}") from None


def add_client_commands(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate images and save them as PNGs")
    generate.add_argument("prompt", nargs="?", help="what to draw (or take it from --from-png)")
    generate.add_argument("-n", "--count", type=int, default=1, help="images (1-5; default 1)")
    generate.add_argument("--seed", type=int, default=None, help="seed of the first image")
    generate.add_argument("--steps", type=int, help="diffusion steps (20)")
    generate.add_argument("--size", type=parse_size, help="WxH (512x512)")
    generate.add_argument("--cfg", type=float, help="guidance scale (7.5)")
    generate.add_argument("--sampler", help="sampler (euler_a)")
    generate.add_argument("--negative", default=None, help="negative prompt")
    generate.add_argument("--model", help="a model id of `diffusiond models` (the default)")
    generate.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        metavar="NAME[:WEIGHT]",
        help="apply a LoRA at WEIGHT (1); repeatable",
    )
    generate.add_argument("--scheduler", help="noise schedule: discrete, karras, ... (discrete)")
    generate.add_argument("--clip-skip", type=int, help="CLIP layers to skip, 1..12 (1: none)")
    generate.add_argument(
        "--from-png",
        type=Path,
        metavar="FILE",
        help="make a diffusiond PNG again: its prompt, seed and settings (flags given win)",
    )
    generate.add_argument(
        "--init-image", type=Path, metavar="FILE", help="redraw this PNG/JPEG/WebP (img2img)"
    )
    generate.add_argument(
        "--mask", type=Path, metavar="FILE", help="with --init-image: white redraws, black keeps"
    )
    generate.add_argument("--strength", type=float, help="with --init-image: 0..1 (0.75)")
    generate.add_argument("--mask-blur", type=int, help="with --mask: feather, pixels (4)")
    generate.add_argument("-o", "--output", type=Path, default=Path("."), help="folder (.)")
    generate.add_argument(
        "--local",
        action="store_true",
        help="generate in this process with no server (built-in model, or DIFFUSIOND_MODEL)",
    )
    generate.add_argument(
        "--backend", default=None, help="with --local: as serve --backend (DIFFUSIOND_BACKEND)"
    )
    _add_server_flag(generate)

    status = commands.add_parser("status", help="show one generation")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_server_flag(status)

    cancel = commands.add_parser("cancel", help="cancel a pending or running generation")
    cancel.add_argument("id")
    _add_server_flag(cancel)

    listing = commands.add_parser("list", help="recent generations, newest first")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument(
        "--status", help="only these statuses, comma-separated (e.g. pending,in_progress)"
    )
    listing.add_argument("--limit", type=int, help="at most this many")
    _add_server_flag(listing)
    add_models_command(commands, _add_server_flag)


def _add_server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=None,
        help="server URL (default: DIFFUSIOND_URL or http://127.0.0.1:8081)",
    )
    parser.add_argument(
        "--api-key", default=None, help="the server's API key (default: DIFFUSIOND_API_KEY)"
    )


def run_client_command(args: argparse.Namespace) -> int:
    """Run generate/status/cancel/list/models; typed errors become one line and an exit status."""
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "generate": _generate_local if getattr(args, "local", False) else _generate,
        "status": _status,
        "cancel": _cancel,
        "list": _list,
        "models": list_models,
    }
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        _say(f"diffusiond: {exc}")
        return EXIT_USAGE
    except ConnectionError as exc:
        _say(f"diffusiond: {exc.message}")
        return EXIT_USAGE
    except GenerationCancelledError as exc:
        _say(f"diffusiond: {exc.message}")
        return EXIT_FAILED
    except DiffusiondClientError as exc:
        code = f" [{exc.code}]" if exc.code else ""
        _say(f"diffusiond: {exc.message}{code}")
        return EXIT_USAGE if exc.status == 400 else EXIT_FAILED


def _say(line: str) -> None:
    """One unwrapped line on stderr."""
    print(line, file=sys.stderr, flush=True)


@contextmanager
def progress_bar() -> Iterator[Callable[[Progress], None]]:
    """A live bar on stderr: stage, image k/n, step, percentage, elapsed, ETA."""
    bar = ProgressBar(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task("starting", total=100)

    def update(progress: Progress) -> None:
        description = (
            f"{progress.stage:<9} image {progress.current_image}/{progress.total_images} "
            f"step {progress.current_step}/{progress.total_steps}"
        )
        bar.update(task, completed=progress.percentage, description=description)

    with bar:
        yield update


_DEFAULTS: dict[str, Any] = {
    "prompt": None,
    "negative_prompt": None,
    "width": None,  # the server's default, or the init image's size
    "height": None,
    "steps": 20,
    "cfg_scale": 7.5,
    "seed": None,
    "sampler": "euler_a",
}


class UsageError(Exception):
    """A command line that cannot run; the message says why."""


def _generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """The request the generate flags (and --from-png) describe, as the client's keyword
    arguments, prompt included. Flags given on the command line win over the PNG's recipe."""
    params = dict(_DEFAULTS)
    if args.from_png is not None:
        try:
            params |= png_parameters(args.from_png)
            needed = png_input_hashes(args.from_png)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--from-png {args.from_png}: {exc}") from None
        _check_same_inputs(args, needed)
    width, height = args.size if args.size is not None else (None, None)
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "seed": args.seed,
        "sampler": args.sampler,
        "init_image": args.init_image,
        "mask_image": args.mask,
        "strength": args.strength,
        "mask_blur": args.mask_blur,
        "model": args.model,
        "loras": args.lora,
        "scheduler": args.scheduler,
        "clip_skip": args.clip_skip,
    }
    params |= {name: value for name, value in given.items() if value is not None}
    for name, flag in _INPUT_FLAGS.items():
        path = params.get(name)
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if not params["prompt"]:
        raise UsageError("a prompt is needed (or --from-png FILE)")
    params["count"] = args.count
    return params


_INPUT_FLAGS = {"init_image": "--init-image", "mask_image": "--mask"}


def _check_same_inputs(args: argparse.Namespace, needed: dict[str, str]) -> None:
    """--from-png of an edit remakes it only from the very files it was made from."""
    from diffusiond.client.inputs import sha256_of

    given = {"init_image": args.init_image, "mask_image": args.mask}
    for name, digest in needed.items():
        flag = _INPUT_FLAGS[name]
        path = given[name]
        if path is None:
            raise UsageError(
                f"--from-png {args.from_png} was made from an input image "
                f"(sha256 {digest}); give the same file again with {flag} FILE"
            )
        try:
            actual = sha256_of(path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{flag} {path}: {exc}") from None
        if actual != digest:
            raise UsageError(
                f"{flag} {path} is not the file {args.from_png} was made from "
                f"(sha256 {actual}, the recipe says {digest})"
            )


def _generate(args: argparse.Namespace) -> int:
    with Client(args.server, api_key=args.api_key) as client:
        generation = client.start(**_generation_params(args))
        try:
            with progress_bar() as update:
                done = client.wait(generation.id, on_progress=update)
        except KeyboardInterrupt:
            # wait() cancels when interrupted inside it; the interrupt may also land
            # outside it (drawing the bar), and cancelling twice is harmless.
            try:
                client.cancel(generation.id)
            except DiffusiondClientError as exc:
                _say(f"diffusiond: interrupted; {generation.id} was not cancelled: {exc.message}")
                return EXIT_INTERRUPTED
            _say(f"diffusiond: interrupted; generation {generation.id} was cancelled")
            return EXIT_INTERRUPTED
    _save_all(args.output, done.id, done.images)
    return 0


def _generate_local(args: argparse.Namespace) -> int:
    from diffusiond.errors import ModelLoadError, SettingsError
    from diffusiond.local import generate_locally

    params = _generation_params(args)
    try:
        with progress_bar() as update:
            job_id, images = generate_locally(on_progress=update, backend=args.backend, **params)
    except (SettingsError, ModelLoadError) as exc:
        raise UsageError(exc.message) from None
    except KeyboardInterrupt:
        _say("diffusiond: interrupted")
        return EXIT_INTERRUPTED
    _save_all(args.output, job_id, images)
    return 0


def _save_all(folder: Path, job_id: str, images: Sequence[GeneratedImage]) -> None:
    # The id names the files: checked again here, whoever produced it.
    safe_id(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images, start=1):
        path = image.save(folder / f"{job_id}-{index}-seed{image.seed}.png")
        print(path)


def _status(args: argparse.Namespace) -> int:
    with Client(args.server, api_key=args.api_key) as client:
        generation = client.get(args.id)
    if args.json:
        print(json.dumps(_summary(generation), indent=2))
        return 0
    print(f"{generation.id}: {generation.status}")
    if generation.progress is not None:
        p = generation.progress
        print(
            f"  {p.stage}, image {p.current_image}/{p.total_images}, "
            f"step {p.current_step}/{p.total_steps}, {p.percentage:.1f}%"
        )
    for index, image in enumerate(generation.images, start=1):
        print(f"  image {index}: seed {image.seed}, {image.width}x{image.height}")
    if generation.time_taken_ms is not None:
        print(f"  took {generation.time_taken_ms / 1000:.1f} s")
    if generation.error_message:
        print(f"  error {generation.error_code}: {generation.error_message}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with Client(args.server, api_key=args.api_key) as client:
        generation = client.cancel(args.id)
    print(f"{generation.id}: {generation.status}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with Client(args.server, api_key=args.api_key) as client:
        generations = client.list(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([_summary(g) for g in generations], indent=2))
        return 0
    table = Table("id", "status", "created", "updated", box=None)
    for generation in generations:
        table.add_row(
            generation.id,
            generation.status,
            _when(generation.created_at),
            _when(generation.updated_at),
        )
    Console(highlight=False, width=120).print(table)
    return 0


def _when(millis: int | None) -> str:
    if millis is None:
        return "-"
    return datetime.datetime.fromtimestamp(millis / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _summary(generation: Generation) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "id": generation.id,
        "status": generation.status,
        "createdAt": generation.created_at,
        "updatedAt": generation.updated_at,
    }
    if generation.progress is not None:
        summary["progress"] = generation.progress.__dict__
    if generation.images:
        summary["images"] = [
            {"seed": i.seed, "width": i.width, "height": i.height} for i in generation.images
        ]
        summary["timeTaken"] = generation.time_taken_ms
    if generation.error_code is not None:
        summary["error"] = {"code": generation.error_code, "message": generation.error_message}
    return summary
