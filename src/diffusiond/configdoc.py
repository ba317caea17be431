"""docs/configuration.md, generated from settings.py's option table.

`python -m diffusiond.configdoc` prints the page; `python -m diffusiond.configdoc --check
PATH` exits 1 (saying how to fix it) when the file at PATH is not what it would print. The
page is never edited by hand: a unit test fails when it and `OPTIONS` disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusiond.settings import ENV_PREFIX, OPTIONS, Option, Settings

REGENERATE = "python -m diffusiond.configdoc > docs/configuration.md"

_INTRO = f"""\
# Configuration

<!-- Generated from src/diffusiond/settings.py (OPTIONS) by `{REGENERATE}`.
     Do not edit by hand: tests/unit/test_configdoc.py fails when this page is stale. -->

Every setting of `diffusiond serve` (and of `diffusiond worker`, which takes the subset it
needs) is a command-line flag and, but for `--insecure`, an environment variable.

**The naming rule.** A setting's variable is `{ENV_PREFIX}` followed by its flag's name in
capitals, with `_` for `-`: `--max-queue` is `{ENV_PREFIX}MAX_QUEUE`. The `IMAGE_*` names of
the original contract ([API.md](API.md#configuration)) and of earlier releases are still
read, as aliases. When several are given, the flag wins, then the `{ENV_PREFIX}*` variable,
then its alias (an alias is not even read when its `{ENV_PREFIX}*` name is set).
`--insecure` has no variable on purpose: switching off the check that refuses to listen
beyond loopback without an API key must be said on the command line, never inherited
unseen from an environment.

A malformed value (`{ENV_PREFIX}RESULT_TTL_MS=abc`, a negative number, a zero interval or
concurrency) stops the server at start with exit status 2 and a message naming the variable
or flag it came from and its rule; it never falls back to a default silently.
`{ENV_PREFIX}RESULT_TTL_MS=0` is valid: terminal jobs go at the next sweep.
`diffusiond serve --help` lists the same options.
"""

# (variable, read by, meaning): variables that are not server settings.
_OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        f"{ENV_PREFIX}URL",
        "the Python client, the CLI's client commands",
        "the server (default `http://127.0.0.1:8081`); `--server URL` wins",
    ),
    (
        f"{ENV_PREFIX}API_KEY",
        "the Python client, the CLI's client commands",
        "the key sent as `Authorization: Bearer KEY` (`api_key=` and `--api-key` win); "
        "the server reads the same name as its own key",
    ),
    ("HF_HUB_OFFLINE", "the server", "always forced to `1`: nothing is ever downloaded"),
    (f"{ENV_PREFIX}CHROMIUM", "tests/e2e", "the Chromium to drive (default `/usr/bin/chromium`)"),
    (
        f"{ENV_PREFIX}UPDATE_SCREENSHOT",
        "tests/e2e",
        "`1`: also copy the finished page's screenshot to `docs/web-page.png`",
    ),
    ("CI", "tests/e2e", "`true`: a missing Chromium fails the web tests instead of skipping"),
)


def _shown(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def default_text(option: Option) -> str:
    """The default as the page shows it: Settings' own, or the option's words for a default
    that depends on the machine (a cache folder, the number of cores)."""
    if option.shown_default:
        return option.shown_default
    default = next(f for f in dataclasses.fields(Settings) if f.name == option.field).default
    if default is dataclasses.MISSING:
        raise ValueError(f"{option.flag} has a computed default: give it shown_default")
    return _shown(default)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(option: Option) -> str:
    variable = f"`{option.env}`" if option.env is not None else "—"
    aliases = ", ".join(f"`{alias}`" for alias in option.aliases) or "—"
    flag = option.flag if option.switch else f"{option.flag} VALUE"
    cells = (f"`{flag}`", variable, aliases, default_text(option), option.help)
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def render(options: Sequence[Option] = OPTIONS) -> str:
    """The whole page, Markdown."""
    table = [
        "## Settings",
        "",
        "| flag | variable | alias | default | meaning |",
        "|---|---|---|---|---|",
        *(_row(option) for option in options),
    ]
    others = [
        "## Other variables",
        "",
        "They are not server settings, so they are not in the table above.",
        "",
        "| variable | read by | meaning |",
        "|---|---|---|",
        *(f"| `{name}` | {reader} | {meaning} |" for name, reader, meaning in _OTHER_VARIABLES),
    ]
    return _INTRO + "\n" + "\n".join(table) + "\n\n" + "\n".join(others) + "\n"


def check(path: Path) -> bool:
    """Whether the file at `path` is exactly the page `render()` makes."""
    try:
        return path.read_text(encoding="utf-8") == render()
    except FileNotFoundError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusiond.configdoc",
        description="Print docs/configuration.md, made from settings.py's option table.",
    )
    parser.add_argument(
        "--check", metavar="PATH", type=Path, help="exit 1 if PATH is not what would be printed"
    )
    args = parser.parse_args(argv)
    if args.check is None:
        sys.stdout.write(render())
        return 0
    if check(args.check):
        return 0
    sys.stderr.write(f"{args.check} is out of date with settings.py; run: {REGENERATE}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
