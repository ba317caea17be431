"""The one place a backend is built from settings: `serve`, `worker` and `generate --local`."""

from __future__ import annotations

import importlib

from diffusiond.backends.base import Backend
from diffusiond.backends.catalog import ModelCatalog, ModelEntry
from diffusiond.backends.components import ROLES, ComponentFiles, components_from_files
from diffusiond.errors import ModelLoadError, SettingsError
from diffusiond.settings import Settings


def model_catalog(settings: Settings) -> ModelCatalog:
    """The catalog of `--models-dir` with `--model` (or the split components of
    `--diffusion-model` and its companions) as its default (API nodes build it too)."""
    return ModelCatalog(
        settings.models_dir, default=settings.model, default_components=flag_components(settings)
    )


def flag_components(settings: Settings) -> ComponentFiles | None:
    """The split components the flags name; None when no component flag is given."""
    files = {role: getattr(settings, role) for role in ROLES}
    given = [role for role, path in files.items() if path is not None]
    if not given:  # --tokenizers alone serves single-file checkpoints (backends/dispatch.py)
        return None
    if settings.model is not None:
        raise SettingsError(
            "--model and --diffusion-model (split components) both name the default model: "
            "give one of them"
        )
    flags = ", ".join("--" + role.replace("_", "-") for role in given)
    try:
        return components_from_files(files, tokenizers=settings.tokenizers, what=flags)
    except ModelLoadError as exc:
        raise SettingsError(str(exc)) from None


def backend_for_model(entry: ModelEntry, settings: Settings) -> Backend:
    """One model's backend, not loaded yet: what the model set builds for each model (the
    family of a diffusers folder picks it: backends/dispatch.py)."""
    from diffusiond.backends.dispatch import backend_for_components, backend_for_model_path

    if entry.components is not None:
        return backend_for_components(entry.components, settings)
    return backend_for_model_path(entry.path, settings)


def make_backend(settings: Settings) -> Backend:
    """The backend `settings.backend` names, checked enough to fail fast on a bad model path.

    'diffusers' is the built-in backend: a model set over the models dir (--models-dir), its
    default --model (backends/model_set.py); `module:factory` names a plugin, called with the
    settings. Nothing is loaded here: the caller loads the model where it will run it.
    """
    if settings.backend == "diffusers":
        from diffusiond.backends.builtin_model import ensure_builtin_model
        from diffusiond.backends.model_set import ModelSet, hasher_in

        catalog = model_catalog(settings)
        default = catalog.find(None)
        if default is not None:
            backend_for_model(default, settings)  # fails fast, naming a bad --model path
        home = settings.home
        return ModelSet(
            catalog,
            lambda entry: backend_for_model(entry, settings),
            max_loaded=settings.max_loaded_models,
            hash_of=hasher_in(home, lambda: ensure_builtin_model(home)),
        )
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
