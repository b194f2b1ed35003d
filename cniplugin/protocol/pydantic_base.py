"""The one door to pydantic for route-tune's models (``protocol.wire``, ``protocol.config``), and
their one pair of base classes.

pydantic looks for plugins when it builds the first model validator: ``pydantic.plugin._loader``
imports ``importlib.metadata`` and then reads the metadata of every installed distribution, a
cost paid once per pod interface by the in-process plugin. route-tune ships and wants no
pydantic plugins, so the processes that route-tune owns (the plugin executable, the resident
engine) call ``transport.pydantic_setup.disable_plugin_discovery()`` before pydantic is imported.
A program that merely imports ``cniplugin`` as a library keeps pydantic exactly as it is.

``Before`` and ``Dump`` are lighter spellings of ``BeforeValidator`` and ``PlainSerializer``.
"""

from __future__ import annotations

from pydantic import (  # noqa: E402
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
    model_validator)
from pydantic_core import core_schema  # noqa: E402

__all__ = ["BaseModel", "Before", "ConfigDict", "Dump", "Field", "Model", "NestedModel",
           "ValidationError", "ValidationInfo", "field_validator", "model_validator"]


class Model(BaseModel):
    """route-tune's models: unknown keys ignored (as Go's ``json.Unmarshal`` does), fields filled
    by alias or name, JSON types taken strictly."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class NestedModel(Model):
    """A model only ever validated inside another's schema: its own validator is built on first
    direct use, so a plugin process does not build one per nested class."""

    model_config = ConfigDict(defer_build=True)


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
