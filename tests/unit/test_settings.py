from __future__ import annotations

from pathlib import Path

import pytest

from diffusiond.errors import SettingsError
from diffusiond.settings import OPTIONS, Settings, env_name, load_settings


def test_defaults_match_the_contract() -> None:
    settings = load_settings({}, {})
    assert settings.result_ttl_ms == 300_000
    assert settings.cleanup_interval_ms == 60_000
    assert settings.max_concurrent == 1
    assert settings.max_batch == 5
    assert settings.poll_interval_ms == 500
    assert settings.host == "127.0.0.1"
    assert settings.port == 8081
    assert settings.model is None
    assert settings.device == "auto"
    assert settings.torch_threads >= 1


def test_environment_is_read() -> None:
    settings = load_settings(
        {
            "IMAGE_RESULT_TTL_MS": "0",
            "IMAGE_CLEANUP_INTERVAL_MS": "10",
            "IMAGE_MAX_CONCURRENT": "2",
            "IMAGE_MAX_BATCH": "8",
            "IMAGE_POLL_INTERVAL_MS": "250",
            "DIFFUSIOND_HOME": "/tmp/x",
            "DIFFUSIOND_TORCH_THREADS": "1",
        },
        {},
    )
    assert (
        settings.result_ttl_ms,
        settings.cleanup_interval_ms,
        settings.max_concurrent,
        settings.max_batch,
        settings.poll_interval_ms,
        settings.torch_threads,
    ) == (0, 10, 2, 8, 250, 1)
    assert settings.home == Path("/tmp/x")


def test_flags_win_over_environment() -> None:
    settings = load_settings({"IMAGE_MAX_CONCURRENT": "2"}, {"max_concurrent": "3", "model": "~/m"})
    assert settings.max_concurrent == 3
    assert settings.model == Path("~/m").expanduser()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGE_RESULT_TTL_MS", "abc"),
        ("IMAGE_RESULT_TTL_MS", "-1"),
        ("IMAGE_RESULT_TTL_MS", "1.5"),
        ("IMAGE_CLEANUP_INTERVAL_MS", "0"),
        ("IMAGE_MAX_CONCURRENT", "0"),
        ("IMAGE_MAX_CONCURRENT", ""),
        ("IMAGE_MAX_BATCH", "0"),
        ("IMAGE_POLL_INTERVAL_MS", "0"),
        ("IMAGE_POLL_INTERVAL_MS", "fast"),
        ("DIFFUSIOND_DEVICE", "tpu"),
        ("DIFFUSIOND_TORCH_THREADS", "0"),
        ("IMAGE_STORE", "redis://x"),
        ("IMAGE_STORE", "sqlite:"),
        ("IMAGE_MAX_QUEUE", "-1"),
        ("IMAGE_MAX_RESULT_BYTES", "1GB"),
        ("DIFFUSIOND_GRACE_SECONDS", "-5"),
    ],
)
def test_malformed_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value}, {})


def test_malformed_flags_name_the_flag() -> None:
    with pytest.raises(SettingsError, match="--port"):
        load_settings({}, {"port": "70000"})


def test_durability_settings() -> None:
    defaults = load_settings({}, {})
    assert (defaults.store, defaults.max_queue, defaults.grace_seconds) == ("memory", 0, 30)
    assert defaults.max_result_bytes == 512 * 1024 * 1024
    settings = load_settings(
        {"IMAGE_STORE": "sqlite: /var/jobs.db ", "IMAGE_MAX_QUEUE": "3"},
        {"max_result_bytes": "0", "grace_seconds": "5"},
    )
    assert (settings.store, settings.max_queue) == ("sqlite:/var/jobs.db", 3)
    assert (settings.max_result_bytes, settings.grace_seconds) == (0, 5)


def test_device_forms() -> None:
    assert load_settings({}, {"device": "cuda:1"}).device == "cuda:1"
    assert load_settings({}, {"device": "CPU"}).device == "cpu"


def test_every_option_is_a_settings_field() -> None:
    fields = set(Settings.__dataclass_fields__)
    assert {option.field for option in OPTIONS} <= fields
    assert len({option.flag for option in OPTIONS}) == len(OPTIONS)


def test_settings_are_frozen() -> None:
    settings = load_settings({}, {})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_dtype_choices_and_a_bad_one_named() -> None:
    assert load_settings({}, {}).dtype == "auto"
    assert load_settings({"DIFFUSIOND_DTYPE": "BFloat16"}, {}).dtype == "bfloat16"
    assert load_settings({"DIFFUSIOND_DTYPE": "float16"}, {"dtype": "float32"}).dtype == "float32"
    with pytest.raises(SettingsError, match="DIFFUSIOND_DTYPE must be one of auto, float32"):
        load_settings({"DIFFUSIOND_DTYPE": "fp8"}, {})
    with pytest.raises(SettingsError, match="--dtype must be one of"):
        load_settings({}, {"dtype": "half"})


def test_every_variable_follows_the_naming_rule() -> None:
    for option in OPTIONS:
        if option.env is not None:
            assert option.env == env_name(option.flag), option.field
        assert all(alias.startswith("IMAGE_") for alias in option.aliases), option.field
    unnamed = [option.flag for option in OPTIONS if option.env is None]
    assert unnamed == ["--insecure"]


# The names the original contract (docs/API.md) and earlier releases promised.
CONTRACT_ALIASES = {
    "IMAGE_RESULT_TTL_MS": ("result_ttl_ms", "0", 0),
    "IMAGE_CLEANUP_INTERVAL_MS": ("cleanup_interval_ms", "10", 10),
    "IMAGE_MAX_CONCURRENT": ("max_concurrent", "2", 2),
    "IMAGE_MAX_BATCH": ("max_batch", "8", 8),
    "IMAGE_POLL_INTERVAL_MS": ("poll_interval_ms", "250", 250),
    "IMAGE_API_KEY": ("api_key", "k" * 16, "k" * 16),
    "IMAGE_CORS_ORIGINS": ("cors_origins", "http://a.test", ("http://a.test",)),
    "IMAGE_MAX_PIXELS": ("max_pixels", "4096", 4096),
    "IMAGE_GENERATION_TIMEOUT_MS": ("generation_timeout_ms", "5", 5),
    "IMAGE_STORE": ("store", "sqlite:/x.db", "sqlite:/x.db"),
    "IMAGE_MAX_QUEUE": ("max_queue", "3", 3),
    "IMAGE_MAX_RESULT_BYTES": ("max_result_bytes", "0", 0),
    "IMAGE_MAX_JOBS": ("max_jobs", "25", 25),
    "IMAGE_MAX_BODY_BYTES": ("max_body_bytes", "1048576", 1048576),
    "IMAGE_MAX_LOADED_MODELS": ("max_loaded_models", "3", 3),
    "IMAGE_ALLOWED_HOSTS": ("allowed_hosts", "gpu.lan, .Example.com.", ("gpu.lan", ".example.com")),
}


@pytest.mark.parametrize("alias", sorted(CONTRACT_ALIASES))
def test_each_old_name_is_still_read(alias: str) -> None:
    field_name, raw, expected = CONTRACT_ALIASES[alias]
    assert getattr(load_settings({alias: raw}, {}), field_name) == expected
    assert getattr(load_settings({}, {}), field_name) != expected


def test_every_alias_is_listed() -> None:
    listed = {alias for option in OPTIONS for alias in option.aliases}
    assert listed == set(CONTRACT_ALIASES)


def test_primary_name_wins_over_its_alias() -> None:
    both = {"DIFFUSIOND_MAX_QUEUE": "4", "IMAGE_MAX_QUEUE": "9"}
    assert load_settings(both, {}).max_queue == 4
    assert load_settings(both, {"max_queue": "7"}).max_queue == 7
    assert load_settings({"IMAGE_MAX_QUEUE": "9"}, {}).max_queue == 9


def test_a_bad_value_names_the_variable_it_came_from() -> None:
    with pytest.raises(SettingsError, match="IMAGE_MAX_QUEUE must be"):
        load_settings({"IMAGE_MAX_QUEUE": "many"}, {})
    with pytest.raises(SettingsError, match="DIFFUSIOND_MAX_QUEUE must be"):
        load_settings({"DIFFUSIOND_MAX_QUEUE": "many", "IMAGE_MAX_QUEUE": "1"}, {})
    # the alias is not read when the primary name is set, even when the alias is malformed
    assert load_settings({"DIFFUSIOND_MAX_QUEUE": "2", "IMAGE_MAX_QUEUE": "x"}, {}).max_queue == 2


def test_host_and_port_from_the_environment() -> None:
    settings = load_settings({"DIFFUSIOND_HOST": "0.0.0.0", "DIFFUSIOND_PORT": "9000"}, {})
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert load_settings({"DIFFUSIOND_PORT": "9000"}, {"port": "0"}).port == 0


def test_insecure_is_never_read_from_the_environment() -> None:
    assert load_settings({"DIFFUSIOND_INSECURE": "true"}, {}).insecure is False


def test_max_jobs_bounds_the_registry_and_is_validated() -> None:
    assert load_settings({}, {}).max_jobs == 1000
    assert load_settings({"IMAGE_MAX_JOBS": "25"}, {}).max_jobs == 25
    assert load_settings({}, {"max_jobs": "7"}).max_jobs == 7
    with pytest.raises(SettingsError, match="IMAGE_MAX_JOBS"):
        load_settings({"IMAGE_MAX_JOBS": "0"}, {})


def test_a_cleanup_interval_event_wait_cannot_take_is_refused_by_name() -> None:
    assert load_settings({"IMAGE_CLEANUP_INTERVAL_MS": "86400000"}, {}).cleanup_interval_ms == (
        86_400_000
    )
    with pytest.raises(SettingsError, match="IMAGE_CLEANUP_INTERVAL_MS must be from 1 to"):
        load_settings({"IMAGE_CLEANUP_INTERVAL_MS": "10000000000000000"}, {})
    with pytest.raises(SettingsError, match="--cleanup-interval-ms"):
        load_settings({}, {"cleanup_interval_ms": "86400001"})
