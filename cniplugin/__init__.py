"""route-tune: policy routing for multi-NIC Kubernetes pods, as a chained CNI plugin.

The public surface is listed in ``__all__``. Everything but the version is loaded on first use
(module ``__getattr__``), so ``import cniplugin`` stays as cheap as reading one constant.
"""

from __future__ import annotations

from cniplugin._version import SUPPORTED_VERSIONS, __version__

__all__ = [
    "__version__", "SUPPORTED_VERSIONS",
    # protocol layer
    "run", "Outcome", "Invocation",
    # wire models
    "Result", "Interface", "IPConfig", "Route", "DNS", "parse_result", "dump_result",
    # configuration
    "PluginConfig", "load_config",
    # environment
    "CniEnv", "CniArgs", "parse_env", "parse_cni_args",
    # errors
    "CNIError", "ERROR_CODES",
]

#: public name -> (module under cniplugin, attribute there)
_LAZY = {
    "run": ("transport.plugin", "serve_request"), "Outcome": ("protocol.dispatch", "Outcome"),
    "Invocation": ("protocol.invocation", "Invocation"),
    "Result": ("protocol.wire", "Result"), "Interface": ("protocol.wire", "Interface"),
    "IPConfig": ("protocol.wire", "IPConfig"), "Route": ("protocol.wire", "Route"), "DNS": ("protocol.wire", "DNS"),
    "parse_result": ("protocol.wire", "parse_result"), "dump_result": ("protocol.wire", "dump_result"),
    "PluginConfig": ("protocol.config", "PluginConfig"), "load_config": ("protocol.config", "load"),
    "CniEnv": ("protocol.env", "CniEnv"), "CniArgs": ("protocol.env", "CniArgs"),
    "parse_env": ("protocol.env", "parse_env"), "parse_cni_args": ("protocol.env", "parse_cni_args"),
    "CNIError": ("protocol.errors", "CNIError"), "ERROR_CODES": ("protocol.errors", "ERROR_CODES"),
}


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'cniplugin' has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(f"cniplugin.{module_name}"), attribute)
    globals()[name] = value  # cache: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
