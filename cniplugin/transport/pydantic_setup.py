"""Switch off pydantic's plugin discovery in processes route-tune owns (stdlib only).

pydantic's ``pydantic.plugin._loader`` imports ``importlib.metadata`` and reads the metadata of
every installed distribution when the first model validator is built, on every in-process
plugin run. route-tune ships and wants no pydantic plugins. The plugin executable
and the resident engine call ``disable_plugin_discovery()`` before pydantic is imported: a
stand-in loader answers "no plugins" (what ``PYDANTIC_DISABLE_PLUGINS=__all__`` does, minus the
import). Library users of ``cniplugin`` never reach this.
"""

from __future__ import annotations

import sys

__all__ = ["disable_plugin_discovery"]

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


def disable_plugin_discovery() -> None:
    """Make pydantic find no plugins in this process; a no-op once pydantic is imported."""
    if _LOADER not in sys.modules and "pydantic" not in sys.modules:
        stand_in = type(sys)(_LOADER, "route-tune: pydantic plugin discovery switched off")
        stand_in.get_plugins = _no_plugins
        stand_in.__getattr__ = _real_loader_attribute
        sys.modules[_LOADER] = stand_in
