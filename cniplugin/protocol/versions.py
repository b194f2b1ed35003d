"""CNI version strings: parsing, comparison and negotiation (stdlib only).

Both the dispatcher and the wire models need these; living here, neither imports the other.
"""

from __future__ import annotations

import json

from cniplugin._version import SUPPORTED_VERSIONS
from cniplugin.protocol.errors import DecodeFailure, IncompatibleVersion

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping

__all__ = ["parse_version", "version_at_least", "negotiate"]


def parse_version(text: Any) -> tuple[int, int, int]:
    """Go's ``version.ParseVersion``: 1 to 3 dot-separated integers; else ``DecodeFailure`` (6)."""
    if not isinstance(text, str) or not text:
        raise DecodeFailure(f"invalid version {json.dumps(text)}: the version is empty"
                            if text == "" else f"invalid version {json.dumps(text)}")
    parts = text.split(".")
    if len(parts) > 3 or not all(p.isdigit() and p.isascii() for p in parts):
        raise DecodeFailure(f'invalid version "{text}"')
    numbers = [int(p) for p in parts] + [0] * (3 - len(parts))
    return numbers[0], numbers[1], numbers[2]


def version_at_least(version: str, minimum: str) -> bool:
    """True when ``version`` >= ``minimum`` (both well-formed)."""
    return parse_version(version) >= parse_version(minimum)


def negotiate(config: Mapping[str, Any]) -> str:
    """The version to speak: the highest of ``cniVersion`` and the 1.1.0 ``cniVersions`` list
    that route-tune supports (libcni picks the same way). A missing ``cniVersion`` means 0.1.0.

    Malformed version strings are code 6; nothing supported is code 1 ``incompatible CNI
    versions`` with Go's details ``config is "X", plugin supports ["0.3.0" ...]``.
    """
    declared = config.get("cniVersion") or "0.1.0"
    parse_version(declared)
    offered = config.get("cniVersions", [])
    if not isinstance(offered, list):
        raise DecodeFailure("cniVersions must be a list of version strings")
    for version in offered:
        parse_version(version)
    usable = [v for v in [declared, *offered] if v in SUPPORTED_VERSIONS]
    if not usable:
        supported = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        raise IncompatibleVersion("incompatible CNI versions",
                                  f'config is "{declared}", plugin supports [{supported}]')
    return max(usable, key=parse_version)
