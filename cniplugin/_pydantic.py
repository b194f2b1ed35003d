"""The one door to pydantic for route-tune's models (``_wire``, ``_config``).

Importing pydantic through here switches off pydantic's plugin discovery first. pydantic looks
for plugins when it builds the first model validator: ``pydantic.plugin._loader`` imports
``importlib.metadata`` (email, zipfile, csv, pathlib ...) and then reads the metadata of every
installed distribution: about 50 ms of CPU on the 2-core VM, paid once per pod interface by
the in-process plugin. route-tune ships and wants no pydantic plugins, so a stand-in loader
answers "no plugins" (as ``PYDANTIC_DISABLE_PLUGINS=__all__`` would, minus the import). Any
other name a future pydantic asks the loader for is served by the real module, loaded on demand.

``Before`` and ``Dump`` are lighter spellings of ``BeforeValidator`` and ``PlainSerializer``.
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
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
    model_validator)
from pydantic_core import core_schema  # noqa: E402

__all__ = ["BaseModel", "Before", "ConfigDict", "Dump", "Field", "ValidationError",
           "ValidationInfo", "field_validator", "model_validator"]


class Before:
    """``Annotated[T, Before(func)]``: ``func(value)`` runs first, then T's own validation.

    pydantic's ``BeforeValidator`` does the same, but inspects ``func``'s signature (does it
    take ``info``?) at every class creation; ours never take ``info``, so the core schema is
    written directly and the model build skips ``inspect.signature``.
    """

    __slots__ = ("func",)

    def __init__(self, func) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_before_validator_function(self.func, handler(source))


class Dump:
    """``Annotated[T, Dump(func)]``: ``model_dump`` writes ``func(value)``; the equivalent of
    ``PlainSerializer(func)`` without its signature and return-type introspection."""

    __slots__ = ("func",)

    def __init__(self, func) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source, handler):
        schema = handler(source)
        schema["serialization"] = core_schema.plain_serializer_function_ser_schema(self.func)
        return schema
