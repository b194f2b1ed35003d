"""route-tune: policy routing for multi-NIC Kubernetes pods, as a chained CNI plugin.

The public surface is listed in ``__all__``. Everything but the version is loaded on first use
(module ``__getattr__``), so ``import cniplugin`` stays as cheap as reading one constant.
"""

from __future__ import annotations

from ._version import SUPPORTED_VERSIONS, __version__

__all__ = [
    "__version__", "SUPPORTED_VERSIONS",
    # protocol layer
    "run", "Outcome", "Request",
    # wire models
    "Result", "Interface", "IPConfig", "Route", "DNS", "parse_result", "dump_result",
    # configuration
    "PluginConfig", "load_config",
    # environment
    "CniEnv", "CniArgs", "parse_env", "parse_cni_args",
    # errors
    "CNIError", "ERROR_CODES",
]

#: public name -> (private module, attribute there)
_LAZY = {
    "run": ("_protocol", "run"), "Outcome": ("_protocol", "Outcome"),
    "Request": ("_protocol", "Request"),
    "Result": ("_wire", "Result"), "Interface": ("_wire", "Interface"),
    "IPConfig": ("_wire", "IPConfig"), "Route": ("_wire", "Route"), "DNS": ("_wire", "DNS"),
    "parse_result": ("_wire", "parse_result"), "dump_result": ("_wire", "dump_result"),
    "PluginConfig": ("_config", "PluginConfig"), "load_config": ("_config", "load"),
    "CniEnv": ("_env", "CniEnv"), "CniArgs": ("_env", "CniArgs"),
    "parse_env": ("_env", "parse_env"), "parse_cni_args": ("_env", "parse_cni_args"),
    "CNIError": ("_errors", "CNIError"), "ERROR_CODES": ("_errors", "ERROR_CODES"),
}


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'cniplugin' has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(f".{module_name}", __name__), attribute)
    globals()[name] = value  # cache: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
