"""Static version facts. Kept import-free: VERSION and --version read only this module."""

__version__ = "0.1.0"

PLUGIN_NAME = "route-tune"

#: CNI spec versions route-tune speaks (0.1.0/0.2.0 have no chaining, so they are refused).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

#: Routing protocol number stamped on every rule, route and neighbour route-tune installs.
#: DEL, CHECK and GC select route-tune's own objects by it and never guess.
RTPROT_ROUTE_TUNE = 231


def about_text() -> str:
    """What skel prints on stderr when CNI_COMMAND is unset (plus route-tune's version)."""
    return (f"CNI {PLUGIN_NAME} plugin v{__version__}\n"
            f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")


def version_reply() -> bytes:
    """The VERSION reply, byte for byte Go's ``PluginInfo.Encode`` (compact JSON, newline).

    Written out rather than json-encoded: the versions are plain ASCII literals, and importing
    ``json`` (with ``re`` and ``enum``) would double the cost of a VERSION call.
    """
    versions = ",".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
    return f'{{"cniVersion":"{SUPPORTED_VERSIONS[-1]}","supportedVersions":[{versions}]}}\n'.encode()
