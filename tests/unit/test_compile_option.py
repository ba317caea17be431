"""--compile / DIFFUSIOND_COMPILE: off by default, read from both, handed to the backend."""

from __future__ import annotations

import pytest

from diffusiond.backends.catalog import ModelEntry
from diffusiond.backends.diffusers_backend import DiffusersBackend
from diffusiond.backends.factory import backend_for_model, make_backend
from diffusiond.backends.model_set import ModelSet
from diffusiond.errors import SettingsError
from diffusiond.settings import load_settings


def test_compile_is_off_by_default_and_read_from_the_environment_and_the_flag() -> None:
    assert load_settings({}, {}).compile is False
    assert load_settings({"DIFFUSIOND_COMPILE": "1"}, {}).compile is True
    assert load_settings({"DIFFUSIOND_COMPILE": "true"}, {"compile": "false"}).compile is False
    assert load_settings({}, {"compile": "true"}).compile is True


def test_a_malformed_compile_variable_is_refused_naming_it() -> None:
    with pytest.raises(SettingsError, match="DIFFUSIOND_COMPILE"):
        load_settings({"DIFFUSIOND_COMPILE": "maybe"}, {})


@pytest.mark.parametrize("wanted", [True, False])
def test_the_backend_is_told_to_compile(wanted: bool) -> None:
    flags = {"compile": str(wanted).lower()}
    settings = load_settings({}, flags)
    assert isinstance(make_backend(settings), ModelSet)
    backend = backend_for_model(ModelEntry("builtin", "builtin", "sd1", None), settings)
    assert isinstance(backend, DiffusersBackend)
    assert backend._compile_model is wanted
