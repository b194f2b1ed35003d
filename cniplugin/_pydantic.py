"""The one door to pydantic for route-tune's models (``_wire``, ``_config``).

Importing pydantic through here switches off pydantic's plugin discovery first. pydantic looks
for plugins when it builds the first model validator: ``pydantic.plugin._loader`` imports
``importlib.metadata`` (email, zipfile, csv, pathlib ...) and then reads the metadata of every
installed distribution. On the 2-core VM that was about a third of pydantic's whole start-up
cost, paid once per pod interface by the in-process plugin. route-tune ships and wants no
pydantic plugins, so a stand-in loader answers "no plugins" (as ``PYDANTIC_DISABLE_PLUGINS=__all__``
would, minus the import). Any other name a future pydantic asks the loader for is served by
the real module, loaded on demand.
"""

from __future__ import annotations

import sys

_LOADER = "pydantic.plugin._loader"


def _no_plugins() -> tuple:
    return ()


def _real_loader_attribute(name: str):
    # Only reached if pydantic wants more than get_plugins: hand over to the real loader.
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib
    sys.modules.pop(_LOADER, None)
    return getattr(importlib.import_module(_LOADER), name)


if _LOADER not in sys.modules:  # a host process that loaded the real one keeps it
    _stand_in = type(sys)(_LOADER, "route-tune: pydantic plugin discovery switched off")
    _stand_in.get_plugins = _no_plugins
    _stand_in.__getattr__ = _real_loader_attribute
    sys.modules[_LOADER] = _stand_in

from pydantic import (  # noqa: E402  (after the stand-in, on purpose)
    BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError,
    ValidationInfo, field_validator, model_validator)

__all__ = ["BaseModel", "BeforeValidator", "ConfigDict", "Field", "PlainSerializer",
           "ValidationError", "ValidationInfo", "field_validator", "model_validator"]
