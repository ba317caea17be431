"""Configuration: read once from the environment and command-line flags, validated, frozen.

The naming rule: a setting's environment variable is `DIFFUSIOND_` and its flag's name in
capitals, `-` as `_` (`--max-queue` is `DIFFUSIOND_MAX_QUEUE`). The `IMAGE_*` names of the
original contract (docs/API.md) and of earlier releases stay accepted as aliases. A flag wins
over the environment, and a `DIFFUSIOND_*` name over its alias. `--insecure` has no variable:
switching off the loopback check is said on the command line, never inherited unseen.

A malformed value stops the server at start with a message naming the variable (or flag) it
came from: never a silent default. `docs/configuration.md` is generated from `OPTIONS`
(`python -m diffusiond.configdoc`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_cache_path

from diffusiond.errors import SettingsError


def default_home() -> Path:
    return user_cache_path("diffusiond", appauthor=False)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Settings:
    """Everything the server is told, checked once and passed down."""

    host: str = "127.0.0.1"
    port: int = 8081
    model: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"  # CUDA only: none, model or sequential offload (backends/offload.py)
    model_config: Path | None = None
    # Split components (stable-diffusion.cpp's roles): together they are the default model.
    diffusion_model: Path | None = None
    vae: Path | None = None
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5xxl: Path | None = None
    llm: Path | None = None
    tokenizers: Path | None = None  # tokenizer folders by role, for files that carry none
    gguf_weights: str = "auto"  # a GGUF diffusion model's quantized weights: kept or not
    models_dir: Path | None = None  # every model folder / checkpoint file in it is a model
    loras_dir: Path | None = None  # None: models_dir/loras
    max_loaded_models: int = 1
    compile: bool = False  # torch.compile the UNet (slow first job)
    backend: str = "diffusers"
    home: Path = field(default_factory=default_home)
    result_ttl_ms: int = 300_000
    cleanup_interval_ms: int = 60_000
    max_concurrent: int = 1
    max_batch: int = 5
    poll_interval_ms: int = 500
    torch_threads: int = field(default_factory=default_threads)
    log_level: str = "info"
    log_json: bool = False
    api_key: str | None = None
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # beyond loopback names and the bound address
    max_streams: int = 64  # open event streams and Prefer: wait requests, together
    max_connections: int = 256  # uvicorn's limit_concurrency: past it, 503 from uvicorn
    max_pixels: int = 1024 * 1024
    max_body_bytes: int = 24 * 1024 * 1024  # of POST /v1/images/generations (images inside)
    generation_timeout_ms: int = 0  # 0: no limit
    http_niceness: int = 12  # measured: see README, Benchmarks (responsiveness.py)
    store: str = "memory"
    max_queue: int = 0
    max_result_bytes: int = 512 * 1024 * 1024
    max_jobs: int = 1000
    grace_seconds: int = 30
    sse_heartbeat_ms: int = 15_000
    broker: str | None = None  # redis://HOST:PORT/DB: API nodes and workers share one queue
    broker_heartbeat_s: int = 10
    broker_sweep_s: int = 5


Parser = Callable[[str], object]

# The sweeper waits on threading.Event.wait, which refuses a timeout past
# threading.TIMEOUT_MAX; a day is far below it and longer than any useful sweep interval.
MAX_CLEANUP_INTERVAL_MS = 86_400_000


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(raw: str) -> int:
        text = raw.strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"must be a whole number, got {raw!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return parse


def _choice(*choices: str, prefix_ok: str | None = None) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value in choices or (
            prefix_ok and value.startswith(prefix_ok) and value[len(prefix_ok) :].isdigit()
        ):
            return value
        extra = f" or {prefix_ok}N" if prefix_ok else ""
        raise ValueError(f"must be one of {', '.join(choices)}{extra}, got {raw!r}")

    return parse


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _path(raw: str) -> Path:
    return Path(_text(raw)).expanduser()


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _api_key(raw: str) -> str:
    key = raw.strip()
    if len(key) < 16 or not key.isprintable() or " " in key:
        raise ValueError("must be at least 16 visible characters with no spaces")
    return key


def _store(raw: str) -> str:
    value = raw.strip()
    if value == "memory":
        return value
    if value.startswith("sqlite:") and value.removeprefix("sqlite:").strip():
        return "sqlite:" + value.removeprefix("sqlite:").strip()
    raise ValueError(f"must be 'memory' or 'sqlite:PATH', got {raw!r}")


def _broker(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("redis://", "rediss://", "unix://")) or value.endswith("://"):
        raise ValueError(f"must be a redis://HOST:PORT/DB (or rediss://, unix://) URL, got {raw!r}")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"must be a comma-separated list of http(s) origins, got {origin!r}")
    return origins


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _hosts(raw: str) -> tuple[str, ...]:
    hosts = tuple(
        host.strip().lower().rstrip(".").strip("[]") for host in raw.split(",") if host.strip()
    )
    for host in hosts:
        name = host.removeprefix(".")
        if host == "*" or _is_ip(host):
            continue
        if not name or any(c in name for c in "/:@ *"):
            raise ValueError(
                "must be a comma-separated list of host names or addresses without a port "
                f"(.example.com for a domain and its subdomains, * for any), got {host!r}"
            )
    return hosts


ENV_PREFIX = "DIFFUSIOND_"


def env_name(flag: str) -> str:
    """The environment variable the naming rule gives a flag: `--max-queue` ->
    `DIFFUSIOND_MAX_QUEUE`."""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


@dataclass(frozen=True)
class Option:
    """One setting: its field, its flag, its environment variable and aliases, its rule.

    `env` is None only for a flag that must be given on the command line; `aliases` are older
    variable names still read when `env` is not set.
    """

    field: str
    flag: str
    env: str | None
    parse: Parser
    help: str
    switch: bool = False  # a flag that takes no value (--insecure), "true" when given
    aliases: tuple[str, ...] = ()
    shown_default: str = ""  # the default as docs/configuration.md shows it; "": Settings'

    def names(self) -> tuple[str, ...]:
        """The environment variables read, the one that wins first."""
        return ((self.env,) if self.env is not None else ()) + self.aliases


OPTIONS: tuple[Option, ...] = (
    Option(
        "host", "--host", "DIFFUSIOND_HOST", _text, "address to listen on (loopback by default)"
    ),
    Option(
        "port",
        "--port",
        "DIFFUSIOND_PORT",
        _integer(0, 65535),
        "port to listen on (0 picks a free one)",
    ),
    Option(
        "model",
        "--model",
        "DIFFUSIOND_MODEL",
        _path,
        "a Stable Diffusion 1.x/2.x/SDXL model: a diffusers folder or a single "
        ".safetensors/.ckpt/.gguf checkpoint (default: the built-in model)",
        shown_default="the built-in model",
    ),
    Option(
        "model_config",
        "--model-config",
        "DIFFUSIOND_MODEL_CONFIG",
        _path,
        "a diffusers config folder describing a single-file checkpoint (default: the config "
        "shipped for the architecture detected from its keys)",
        shown_default="the shipped config",
    ),
    Option(
        "diffusion_model",
        "--diffusion-model",
        "DIFFUSIOND_DIFFUSION_MODEL",
        _path,
        "the diffusion model (transformer) file of a FLUX.1, FLUX.2 klein, SD 3.x, Z-Image, "
        "Qwen-Image or Chroma model given as split components (.safetensors or .gguf); with "
        "the files of the other roles its family needs it is the default model, its id the "
        "file stem",
        shown_default="none",
    ),
    Option(
        "vae",
        "--vae",
        "DIFFUSIOND_VAE",
        _path,
        "the VAE file of the split-component model (.safetensors or .gguf)",
        shown_default="none",
    ),
    Option(
        "clip_l",
        "--clip-l",
        "DIFFUSIOND_CLIP_L",
        _path,
        "the CLIP-L text encoder file of the split-component model (FLUX.1, SD 3.x)",
        shown_default="none",
    ),
    Option(
        "clip_g",
        "--clip-g",
        "DIFFUSIOND_CLIP_G",
        _path,
        "the CLIP-G text encoder file of the split-component model (SD 3.x)",
        shown_default="none",
    ),
    Option(
        "t5xxl",
        "--t5xxl",
        "DIFFUSIOND_T5XXL",
        _path,
        "the T5-XXL text encoder file of the split-component model (FLUX.1, SD 3.x, Chroma)",
        shown_default="none",
    ),
    Option(
        "llm",
        "--llm",
        "DIFFUSIOND_LLM",
        _path,
        "the language-model text encoder file of the split-component model (FLUX.2 klein, "
        "Z-Image, Qwen-Image)",
        shown_default="none",
    ),
    Option(
        "tokenizers",
        "--tokenizers",
        "DIFFUSIOND_TOKENIZERS",
        _path,
        "a folder of Hugging Face tokenizer folders by role (t5xxl/, llm/, ...) for component "
        "files that carry no tokenizer",
        shown_default="none",
    ),
    Option(
        "gguf_weights",
        "--gguf-weights",
        "DIFFUSIOND_GGUF_WEIGHTS",
        _choice("auto", "dequantize", "quantized"),
        "a GGUF diffusion model's quantized linear weights (FLUX.1, FLUX.2 klein, SD 3.x, "
        "Z-Image, Qwen-Image, Chroma): dequantize (to the compute dtype at load: fastest), "
        "quantized (kept as their blocks and dequantized at every use: a Q8_0 FLUX.1 takes "
        "about 12 GB instead of 23 GB in bfloat16, a Q4_0 about 7 GB, but its steps are "
        "2.5-4x slower on CPU) or auto (quantized only when the dequantized model would take "
        "over half the memory available at load)",
    ),
    Option(
        "models_dir",
        "--models-dir",
        "DIFFUSIOND_MODELS_DIR",
        _path,
        "a folder of models: each diffusers folder and single-file checkpoint directly in it "
        "is a model, its id the folder name or file stem (the built-in model is `builtin`)",
        shown_default="none",
    ),
    Option(
        "loras_dir",
        "--loras-dir",
        "DIFFUSIOND_LORAS_DIR",
        _path,
        "a folder of LoRA files (.safetensors), each named by its file stem",
        shown_default="MODELS_DIR/loras",
    ),
    Option(
        "max_loaded_models",
        "--max-loaded-models",
        "DIFFUSIOND_MAX_LOADED_MODELS",
        _integer(1, 16),
        "models kept loaded at once; a request for another unloads the least recently used",
        aliases=("IMAGE_MAX_LOADED_MODELS",),
    ),
    Option(
        "device",
        "--device",
        "DIFFUSIOND_DEVICE",
        _choice("auto", "cpu", "cuda", prefix_ok="cuda:"),
        "auto, cpu, cuda or cuda:N (auto: cuda when available)",
    ),
    Option(
        "dtype",
        "--dtype",
        "DIFFUSIOND_DTYPE",
        _choice("auto", "float32", "bfloat16", "float16"),
        "auto, float32, bfloat16 or float16 (auto: bfloat16 on CPUs with native bf16, "
        "float16 on CUDA, float32 otherwise)",
    ),
    Option(
        "offload",
        "--offload",
        "DIFFUSIOND_OFFLOAD",
        _choice("auto", "none", "model", "sequential"),
        "auto, none, model or sequential: on CUDA, keep the weights in host memory and move "
        "each module (model) or each layer (sequential, slowest) to the GPU only while it "
        "runs; auto picks from the GPU's free memory at load (ignored on the CPU)",
    ),
    Option(
        "backend",
        "--backend",
        "DIFFUSIOND_BACKEND",
        _text,
        "'diffusers', or module:factory of a plugin backend (the tests inject faults so)",
    ),
    Option(
        "home",
        "--home",
        "DIFFUSIOND_HOME",
        _path,
        "cache folder for the built-in model (default: the user's cache dir)",
        shown_default="~/.cache/diffusiond",
    ),
    Option(
        "result_ttl_ms",
        "--result-ttl-ms",
        "DIFFUSIOND_RESULT_TTL_MS",
        _integer(0),
        "how long terminal jobs are kept, in ms (default 300000; 0: until the next sweep)",
        aliases=("IMAGE_RESULT_TTL_MS",),
    ),
    Option(
        "cleanup_interval_ms",
        "--cleanup-interval-ms",
        "DIFFUSIOND_CLEANUP_INTERVAL_MS",
        _integer(1, MAX_CLEANUP_INTERVAL_MS),
        "how often the TTL sweep runs, in ms (default 60000; at most 86400000, one day)",
        aliases=("IMAGE_CLEANUP_INTERVAL_MS",),
    ),
    Option(
        "max_concurrent",
        "--max-concurrent",
        "DIFFUSIOND_MAX_CONCURRENT",
        _integer(1, 64),
        "generations that run at once (1..64; default 1)",
        aliases=("IMAGE_MAX_CONCURRENT",),
    ),
    Option(
        "max_batch",
        "--max-batch",
        "DIFFUSIOND_MAX_BATCH",
        _integer(1, 100),
        "the largest count a request may ask for (1..100; default 5)",
        aliases=("IMAGE_MAX_BATCH",),
    ),
    Option(
        "poll_interval_ms",
        "--poll-interval-ms",
        "DIFFUSIOND_POLL_INTERVAL_MS",
        _integer(1),
        "the poll interval the server advises clients, in ms (default 500)",
        aliases=("IMAGE_POLL_INTERVAL_MS",),
    ),
    Option(
        "torch_threads",
        "--torch-threads",
        "DIFFUSIOND_TORCH_THREADS",
        _integer(1, 1024),
        "CPU threads PyTorch may use (default: the cores this process may run on)",
        shown_default="the cores this process may run on",
    ),
    Option(
        "log_level",
        "--log-level",
        "DIFFUSIOND_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "debug, info, warning or error",
    ),
    Option(
        "http_niceness",
        "--http-niceness",
        "DIFFUSIOND_HTTP_NICENESS",
        _integer(0, 19),
        "nice levels (0..19) the HTTP thread runs below generation (default 12; 0: same)",
    ),
    Option(
        "log_json",
        "--log-json",
        "DIFFUSIOND_LOG_JSON",
        _boolean,
        "log one JSON object per line, for machines",
        switch=True,
    ),
    Option(
        "api_key",
        "--api-key",
        "DIFFUSIOND_API_KEY",
        _api_key,
        "require 'Authorization: Bearer KEY' (16+ visible characters, no spaces) on every "
        "endpoint but /health and the web page's files",
        aliases=("IMAGE_API_KEY",),
    ),
    Option(
        "compile",
        "--compile",
        "DIFFUSIOND_COMPILE",
        _boolean,
        "torch.compile the UNet: faster steps after a first job that "
        "compiles (minutes on a CPU; cached under --home for the next start)",
        switch=True,
    ),
    Option(
        "insecure",
        "--insecure",
        None,
        _boolean,
        "allow listening on a non-loopback address without an API key",
        switch=True,
    ),
    Option(
        "cors_origins",
        "--cors-origins",
        "DIFFUSIOND_CORS_ORIGINS",
        _origins,
        "comma-separated browser origins allowed to call the API (*: any; default: none)",
        aliases=("IMAGE_CORS_ORIGINS",),
    ),
    Option(
        "allowed_hosts",
        "--allowed-hosts",
        "DIFFUSIOND_ALLOWED_HOSTS",
        _hosts,
        "comma-separated Host names the server answers to besides loopback names and the "
        "address it listens on (.example.com: a domain and its subdomains; *: any); "
        "other Hosts get 403 FORBIDDEN_HOST",
        aliases=("IMAGE_ALLOWED_HOSTS",),
    ),
    Option(
        "max_streams",
        "--max-streams",
        "DIFFUSIOND_MAX_STREAMS",
        _integer(1, 100_000),
        "event streams and Prefer: wait requests open at once; past it 503 SERVER_BUSY "
        "(default 64)",
    ),
    Option(
        "max_connections",
        "--max-connections",
        "DIFFUSIOND_MAX_CONNECTIONS",
        _integer(8, 1_000_000),
        "HTTP connections and requests served at once; past it the server answers 503 "
        "(default 256; keep it above --max-streams)",
    ),
    Option(
        "max_pixels",
        "--max-pixels",
        "DIFFUSIOND_MAX_PIXELS",
        _integer(4096),
        "largest width x height a request may ask for; more is a 400 (default 1048576)",
        aliases=("IMAGE_MAX_PIXELS",),
    ),
    Option(
        "max_body_bytes",
        "--max-body-bytes",
        "DIFFUSIOND_MAX_BODY_BYTES",
        _integer(64 * 1024),
        "largest POST /v1/images/generations body, in bytes, refused from Content-Length "
        "before it is read (its initImage and maskImage travel in it; default 25165824)",
        aliases=("IMAGE_MAX_BODY_BYTES",),
    ),
    Option(
        "generation_timeout_ms",
        "--generation-timeout-ms",
        "DIFFUSIOND_GENERATION_TIMEOUT_MS",
        _integer(0),
        "end a job running longer than this, in ms, as TIMEOUT_ERROR (default 0: off)",
        aliases=("IMAGE_GENERATION_TIMEOUT_MS",),
    ),
    Option(
        "store",
        "--store",
        "DIFFUSIOND_STORE",
        _store,
        "where jobs are kept: memory (default; lost on restart) or sqlite:PATH",
        aliases=("IMAGE_STORE",),
    ),
    Option(
        "max_queue",
        "--max-queue",
        "DIFFUSIOND_MAX_QUEUE",
        _integer(0, 100_000),
        "jobs that may wait for a worker (default 0: a busy server answers 503)",
        aliases=("IMAGE_MAX_QUEUE",),
    ),
    Option(
        "max_result_bytes",
        "--max-result-bytes",
        "DIFFUSIOND_MAX_RESULT_BYTES",
        _integer(0),
        "PNG bytes of results kept before the oldest are evicted (default 536870912; 0: no cap)",
        aliases=("IMAGE_MAX_RESULT_BYTES",),
    ),
    Option(
        "max_jobs",
        "--max-jobs",
        "DIFFUSIOND_MAX_JOBS",
        _integer(1, 10_000_000),
        "jobs the server keeps (default 1000): past it the jobs that ended first are dropped "
        "before their TTL, never pending or running ones",
        aliases=("IMAGE_MAX_JOBS",),
    ),
    Option(
        "grace_seconds",
        "--grace-seconds",
        "DIFFUSIOND_GRACE_SECONDS",
        _integer(0, 86_400),
        "on SIGTERM/SIGINT, how long running generations may finish (default 30)",
    ),
    Option(
        "sse_heartbeat_ms",
        "--sse-heartbeat-ms",
        "DIFFUSIOND_SSE_HEARTBEAT_MS",
        _integer(10, 3_600_000),
        "a comment line on idle event streams every this many ms (default 15000)",
    ),
    Option(
        "broker",
        "--broker",
        "DIFFUSIOND_BROKER",
        _broker,
        "redis://HOST:PORT/DB: serve as an API node of a queue that workers take jobs from",
    ),
    Option(
        "broker_heartbeat_s",
        "--broker-heartbeat-s",
        "DIFFUSIOND_BROKER_HEARTBEAT_S",
        _integer(2, 3600),
        "a running job whose worker is silent this long ends as WORKER_LOST (default 10)",
    ),
    Option(
        "broker_sweep_s",
        "--broker-sweep-s",
        "DIFFUSIOND_BROKER_SWEEP_S",
        _integer(1, 3600),
        "how often jobs of silent workers are looked for, in s (default 5)",
    ),
)


def load_settings(env: Mapping[str, str], flags: Mapping[str, str | None]) -> Settings:
    """Settings from environment variables, overridden by flags (keyed by field name).

    Raises `SettingsError` naming the variable or flag and its rule for a malformed value.
    """
    values: dict[str, object] = {}
    for option in OPTIONS:
        source, raw = _raw_value(option, env, flags)
        if raw is None:
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{source} {exc} ({option.help})") from None
    return dataclasses.replace(Settings(), **values)  # type: ignore[arg-type]


def _raw_value(
    option: Option, env: Mapping[str, str], flags: Mapping[str, str | None]
) -> tuple[str, str | None]:
    """The raw value and where it came from: the flag, else the first variable set of
    `option.names()` (the `DIFFUSIOND_*` name before its aliases)."""
    flag_value = flags.get(option.field)
    if flag_value is not None:
        return option.flag, flag_value
    for name in option.names():
        if name in env:
            return name, env[name]
    return "", None
