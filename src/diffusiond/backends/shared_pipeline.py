"""Another pipeline class over a loaded pipeline's modules, with no copy and no cast.

diffusers' `from_pipe` does the same sharing but ends by casting the new pipeline to a dtype
(float32 unless told): the modules are shared, so that casts the loaded model itself, and a
bfloat16 model doubled its memory on its first edit or flow-family request. Building the
pipeline class from the loaded modules directly leaves every module as it was loaded.
"""

from __future__ import annotations

import inspect
from typing import Any


def share_pipeline(pipeline_class: Any, base: Any, **replacements: Any) -> Any:
    """`pipeline_class` over `base`'s modules (those it takes), `replacements` (e.g. a
    fresh scheduler) instead of base's, and base's config values for its other arguments
    (e.g. `requires_safety_checker`, `is_distilled`)."""
    parameters = inspect.signature(pipeline_class.__init__).parameters
    components = base.components
    arguments: dict[str, Any] = {}
    for name in parameters:
        if name == "self" or parameters[name].kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        if name in replacements:
            arguments[name] = replacements[name]
        elif name in components:
            arguments[name] = components[name]
        elif name in base.config:
            arguments[name] = base.config[name]
    return pipeline_class(**arguments)
