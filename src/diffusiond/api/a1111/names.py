"""AUTOMATIC1111's names for what diffusiond calls otherwise: samplers, schedulers,
checkpoints, and the `<lora:name:weight>` tags of a prompt. Every name table of the
AUTOMATIC1111 front door lives here, as pure data and pure functions."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from diffusiond.backends.catalog import ModelEntry
from diffusiond.errors import InvalidRequest
from diffusiond.jobs.models import LORA_WEIGHT_LIMIT, MAX_LORAS
from diffusiond.sampling import schedule_problem

PREFIX = "/sdapi/v1"  # where the AUTOMATIC1111 routes are mounted


@dataclass(frozen=True)
class A1111Sampler:
    """One AUTOMATIC1111 sampler: its name, the other names it answers to, the diffusiond
    sampler that runs it and the scheduler its "Automatic" means (A1111 1.9+ defaults)."""

    name: str
    aliases: tuple[str, ...]
    sampler: str
    default_scheduler: str = "discrete"


# A1111 1.9+ runs DPM++ 2M, DPM++ 2S a and DPM2 on Karras sigmas when the scheduler is
# "Automatic"; the others on the model's own (discrete) timesteps.
SAMPLER_TABLE: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++2m", "karras"),
    A1111Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "dpm++2s_a", "karras"),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a"),
    A1111Sampler("Euler", ("k_euler",), "euler"),
    A1111Sampler("Heun", ("k_heun",), "heun"),
    A1111Sampler("DPM2", ("k_dpm_2",), "dpm2", "karras"),
    A1111Sampler("DDIM", ("ddim",), "ddim"),
    A1111Sampler("UniPC", ("unipc",), "unipc"),
    A1111Sampler("LCM", ("k_lcm", "lcm"), "lcm"),
    # Forge's and ComfyUI's names for samplers A1111 itself does not have.
    A1111Sampler("Euler CFG++", ("euler_cfg_pp",), "euler_cfg_pp"),
    A1111Sampler("Euler a CFG++", ("euler_ancestral_cfg_pp",), "euler_a_cfg_pp"),
    A1111Sampler("ER SDE", ("er_sde",), "er_sde"),
)


@dataclass(frozen=True)
class A1111Scheduler:
    name: str  # what A1111 1.9+ sends and lists
    label: str  # what its UI shows; accepted as well
    scheduler: str | None  # diffusiond's; None: the sampler's default ("Automatic")


SCHEDULER_TABLE: tuple[A1111Scheduler, ...] = (
    A1111Scheduler("automatic", "Automatic", None),
    A1111Scheduler("uniform", "Uniform", "discrete"),
    A1111Scheduler("karras", "Karras", "karras"),
    A1111Scheduler("exponential", "Exponential", "exponential"),
    A1111Scheduler("sgm_uniform", "SGM Uniform", "sgm_uniform"),
    A1111Scheduler("simple", "Simple", "simple"),
    # A1111's "normal" spaces the model's timesteps evenly: the discrete schedule here.
    A1111Scheduler("normal", "Normal", "discrete"),
)

# The names A1111 before 1.9 gave a sampler on another schedule ("DPM++ 2M Karras").
_SCHEDULE_SUFFIXES = {" karras": "karras", " exponential": "exponential"}


def _key(name: str) -> str:
    return " ".join(name.split()).lower()


def samplers_available(samplers: Collection[str]) -> list[A1111Sampler]:
    """The table's samplers that this server can run (diffusiond's `samplers`)."""
    return [entry for entry in SAMPLER_TABLE if entry.sampler in samplers]


def schedulers_available(schedulers: Collection[str]) -> list[A1111Scheduler]:
    return [
        entry
        for entry in SCHEDULER_TABLE
        if entry.scheduler is None or entry.scheduler in schedulers
    ]


def _sampler_rule(samplers: Collection[str]) -> str:
    names = [entry.name for entry in samplers_available(samplers)]
    return "one of " + ", ".join(names) + " (optionally followed by Karras or Exponential)"


def _find_sampler(key: str, samplers: Collection[str]) -> A1111Sampler | None:
    for entry in samplers_available(samplers):
        if key == _key(entry.name) or key in (_key(alias) for alias in entry.aliases):
            return entry
    return None


def map_sampler(
    sampler_name: str | None,
    scheduler_name: str | None,
    *,
    samplers: Collection[str],
    schedulers: Collection[str],
) -> tuple[str, str]:
    """(diffusiond sampler, diffusiond scheduler) for A1111's `sampler_name` and
    `scheduler`; a 400 naming the field otherwise.

    An explicit scheduler other than Automatic wins over a legacy suffix ("DPM++ 2M Karras"
    with scheduler "Exponential" runs exponential), as in A1111 1.9+.
    """
    key = _key(sampler_name or "Euler a")
    entry = _find_sampler(key, samplers)
    suffix_schedule = None
    if entry is None:
        for suffix, schedule in _SCHEDULE_SUFFIXES.items():
            if key.endswith(suffix):
                entry = _find_sampler(key.removesuffix(suffix), samplers)
                suffix_schedule = schedule
                break
    if entry is None:
        rule = _sampler_rule(samplers)
        raise InvalidRequest(
            f"sampler_name must be {rule}, got {sampler_name!r}", field="sampler_name", rule=rule
        )
    chosen = map_scheduler(scheduler_name, schedulers)
    if chosen is None:
        chosen = suffix_schedule or entry.default_scheduler
    if chosen not in schedulers:  # a sampler's default this server cannot run
        chosen = "discrete"
    problem = schedule_problem(entry.sampler, chosen)  # e.g. DDIM on Karras sigmas
    if problem is not None:
        raise InvalidRequest(problem, field="scheduler", rule="a schedule the sampler takes")
    return entry.sampler, chosen


def map_scheduler(scheduler_name: str | None, schedulers: Collection[str]) -> str | None:
    """diffusiond's scheduler for A1111's `scheduler`; None for Automatic (or none given)."""
    if scheduler_name is None:
        return None
    key = _key(scheduler_name)
    for entry in schedulers_available(schedulers):
        if key in (_key(entry.name), _key(entry.label)):
            return entry.scheduler
    names = ", ".join(entry.name for entry in schedulers_available(schedulers))
    rule = f"one of {names} (or their labels)"
    raise InvalidRequest(
        f"scheduler must be {rule}, got {scheduler_name!r}", field="scheduler", rule=rule
    )


# <lora:name:weight> or <lora:name> (weight 1), as A1111's extra networks write them.
_LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)


def split_lora_tags(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The prompt without its `<lora:name:weight>` tags, and each tag's (name, weight), in
    order; a name given twice keeps its last weight. A bad weight is a 400 on `prompt`."""
    weights: dict[str, float] = {}
    for match in _LORA_TAG.finditer(prompt):
        name = match.group(1).strip()
        raw = (match.group(2) or "1").strip()
        rule = (
            f"<lora:name:weight> with a weight from -{LORA_WEIGHT_LIMIT:g} to {LORA_WEIGHT_LIMIT:g}"
        )
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not name or not -LORA_WEIGHT_LIMIT <= weight <= LORA_WEIGHT_LIMIT:
            raise InvalidRequest(
                f"prompt has {match.group(0)!r}: a LoRA tag must be {rule}",
                field="prompt",
                rule=rule,
            )
        weights.pop(name, None)
        weights[name] = weight
    # Where a tag was, the commas and spaces around it would be left doubled: close them up.
    if len(weights) > MAX_LORAS:
        rule = f"at most {MAX_LORAS} different <lora:...> tags"
        raise InvalidRequest(
            f"prompt has {len(weights)} LoRA tags: {rule}", field="prompt", rule=rule
        )
    text = re.sub(r",[ \t]*(?=,)", "", _LORA_TAG.sub("", prompt))
    text = re.sub(r"[ \t]+(?=[ \t,]|$)", "", text)
    text = text.strip(" \t,")
    return text, tuple(weights.items())


@dataclass(frozen=True)
class Checkpoint:
    """One model as `GET /sd-models` lists it; `model_id` None is the server's default."""

    title: str  # what sd_model_checkpoint holds: "name [hash]"
    model_name: str
    hash: str
    sha256: str
    filename: str
    model_id: str | None


_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".gguf", ".bin", ".pt", ".pth")


def _checkpoint_key(name: str) -> str:
    key = _key(_TITLE_HASH.sub("", name))
    for suffix in _WEIGHT_SUFFIXES:
        key = key.removesuffix(suffix)
    return key


def map_checkpoint(
    name: str, checkpoints: Sequence[Checkpoint], field: str = "sd_model_checkpoint"
) -> Checkpoint:
    """The checkpoint a `sd_model_checkpoint` names: by its title, its model name or
    filename, with or without the `[hash]` and the file suffix, ignoring case."""
    key = _checkpoint_key(name)
    for checkpoint in checkpoints:
        names = (checkpoint.title, checkpoint.model_name, checkpoint.filename)
        if key and key in (_checkpoint_key(candidate) for candidate in names):
            return checkpoint
        if checkpoint.model_id is not None and key == _key(checkpoint.model_id):
            return checkpoint
    rule = "the title of one of the models GET /sdapi/v1/sd-models lists"
    raise InvalidRequest(f"{field} must be {rule}, got {name!r}", field=field, rule=rule)


def catalog_checkpoint(entry: ModelEntry, default_id: str) -> Checkpoint:
    """One model of the models dir (backends/catalog.py), titled by its id; as for the
    single model, a hash of the name stands in for the file's (hashing weights is work for
    the job that loads them, not for a listing)."""
    digest = hashlib.sha256(entry.id.encode()).hexdigest()
    return Checkpoint(
        title=f"{entry.id} [{digest[:10]}]",
        model_name=entry.id,
        hash=digest[:10],
        sha256=digest,
        filename=entry.path.name if entry.path is not None else entry.id,
        model_id=None if entry.id == default_id else entry.id,
    )
