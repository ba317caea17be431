"""The one place a backend is built from settings: `serve`, `worker` and `generate --local`."""

from __future__ import annotations

import importlib

from diffusiond.backends.base import Backend
from diffusiond.errors import SettingsError
from diffusiond.settings import Settings


def make_backend(settings: Settings) -> Backend:
    """The backend `settings.backend` names, checked enough to fail fast on a bad model path.

    'diffusers' is the built-in backend; `module:factory` names a plugin, called with the
    settings. Nothing is loaded here: the caller loads the model where it will run it.
    """
    if settings.backend == "diffusers":
        from diffusiond.backends.dispatch import backend_for_model_path

        return backend_for_model_path(settings.model, settings)
    module_name, _, attribute = settings.backend.partition(":")
    if not module_name or not attribute:
        raise SettingsError(
            f"--backend must be 'diffusers' or module:factory, got {settings.backend!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"--backend {settings.backend!r} cannot be imported: {exc}") from None
    backend: Backend = factory(settings)
    return backend
