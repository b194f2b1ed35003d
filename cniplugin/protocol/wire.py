"""CNI result wire models (canonical 1.x) and conversion between spec versions.

One canonical shape inside route-tune: the 1.1.0 result. ``parse_result`` accepts any chained-era
shape (0.3.0/0.3.1/0.4.0 with ``ips[].version``, 1.0.0/1.1.0, and even the 0.2.0 ``ip4``/``ip6``
shape that Go's converter still reads) and ``dump_result`` writes exactly what Go's ``PrintResult``
would for the requested version:

- ``ips[].version`` appears exactly below 1.0.0 (derived from the address family);
- every field except ``name``, ``address`` and ``dst`` is left out when empty; ``interface``,
  ``table`` and ``scope`` are written when set, even as 0 (Go pointers);
- the 1.1-only fields (``interfaces[].mtu/socketPath/pciID``, ``routes[].mtu/advmss/priority/
  table/scope``) are dropped below 1.1.0;
- ``dns`` is ``{}`` when empty below 1.0.0 (Go's 040 type always prints it) and left out from 1.0.0.

Addresses are ``ipaddress`` objects. ``IPConfig.address`` and ``Route.dst`` are interface objects so
host bits survive a round trip exactly as Go keeps them; use ``.network`` for the network.

This module imports pydantic; it is imported only by commands that parse a result or a config.
Version negotiation is stdlib and lives in ``protocol.versions``; it is re-exported here for convenience.
"""

# No ``from __future__ import annotations``: pydantic would have to compile and eval every field's
# annotation string at class creation, on every plugin process.
import ipaddress
from typing import Annotated, Any, Union

from cniplugin.protocol.pydantic_base import Before, Dump, Field, Model, NestedModel, ValidationError
from cniplugin.protocol.errors import IncompatibleVersion, InvalidConfig
from cniplugin.protocol.versions import negotiate, parse_version, version_at_least
from cniplugin._version import SUPPORTED_VERSIONS

__all__ = [
    "Interface", "IPConfig", "Route", "DNS", "Result", "parse_result", "dump_result",
    "negotiate", "parse_version", "version_at_least",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


def _to_interface(value: Any) -> IPInterface:
    """``ip/prefix`` (prefix required, as Go's ParseCIDR) -> IPv4Interface | IPv6Interface."""
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return value
    if not isinstance(value, str) or "/" not in value or "%" in value:
        raise ValueError("an address with prefix length in CIDR form, e.g. 10.1.0.5/24")
    return ipaddress.ip_interface(value)


def _to_address(value: Any) -> IPAddress | None:
    """An IP address; ``""``/null mean "not set" (Go's omitempty)."""
    if value is None or value == "":
        return None
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str) or "%" in value:
        raise ValueError("an IP address")
    return ipaddress.ip_address(value)


CIDRField = Annotated[IPInterface, Before(_to_interface), Dump(str)]
AddressField = Annotated[Union[IPAddress, None], Before(_to_address),
                         Dump(lambda v: "" if v is None else str(v))]


class Interface(NestedModel):
    name: str
    mac: str = ""
    mtu: int = 0
    sandbox: str = ""
    socket_path: str = Field("", alias="socketPath")
    pci_id: str = Field("", alias="pciID")


class IPConfig(NestedModel):
    address: CIDRField
    gateway: AddressField = None
    interface: int | None = Field(None, ge=0)

    @property
    def family(self) -> int:
        return self.address.version


class Route(NestedModel):
    dst: CIDRField
    gw: AddressField = None
    mtu: int = 0
    advmss: int = 0
    priority: int = 0
    table: int | None = None
    scope: int | None = None


class DNS(NestedModel):
    nameservers: list[str] = []
    domain: str = ""
    search: list[str] = []
    options: list[str] = []


class Result(Model):
    """The canonical (1.1.0) result. ``cni_version`` is where it came from; dumping sets it anew."""

    cni_version: str = Field("", alias="cniVersion")
    interfaces: list[Interface] = []
    ips: list[IPConfig] = []
    routes: list[Route] = []
    dns: DNS = Field(default_factory=DNS)


def _from_020(obj: dict) -> dict:
    """Go's convertFrom02x: ``ip4``/``ip6`` blocks become ``ips`` + ``routes``."""
    converted: dict[str, Any] = {"ips": [], "routes": [], "dns": obj.get("dns") or {}}
    for key in ("ip4", "ip6"):
        block = obj.get(key)
        if not isinstance(block, dict):
            continue
        converted["ips"].append({"address": block.get("ip"), "gateway": block.get("gateway")})
        converted["routes"].extend(block.get("routes") or [])
    return converted


def _location(loc: tuple) -> str:
    text = "prevResult"
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def parse_result(obj: Any, cni_version: str) -> Result:
    """Parse a ``prevResult`` into the canonical 1.x ``Result``.

    The result's own ``cniVersion`` decides its shape; without one it is read as ``cni_version``
    (the config's version, as libcni and Go's ParsePrevResult do). A 1.x result that still carries
    ``ips[].version`` is accepted (the field is ignored). Raises ``InvalidConfig`` (7) naming the bad
    field, or ``IncompatibleVersion`` (1) for a result version Go could not convert either.
    """
    if not isinstance(obj, dict):
        raise InvalidConfig("key `prevResult`: expected a JSON object")
    version = obj.get("cniVersion") or cni_version
    if not isinstance(version, str):
        raise InvalidConfig(f"key `prevResult.cniVersion`: value `{version}` is not a string")
    if version in ("0.1.0", "0.2.0"):
        body = _from_020(obj)
    elif version in SUPPORTED_VERSIONS:
        body = obj
    else:
        raise IncompatibleVersion("unsupported prevResult version",
                                  f"prevResult is \"{version}\"")
    try:
        result = Result.model_validate({k: v for k, v in body.items() if k != "cniVersion"})
    except ValidationError as exc:
        first = exc.errors()[0]
        value = first.get("input")
        expected = first["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        raise InvalidConfig(f"key `{_location(first['loc'])}`: value `{value}` is not valid; "
                            f"expected {expected}") from None
    result.cni_version = version
    return result


def _omit_empty(pairs: list[tuple[str, Any]]) -> dict:
    return {key: value for key, value in pairs if value not in ("", 0, None, [], {})}


def dump_result(result: Result, cni_version: str) -> dict:
    """The JSON object Go's ``PrintResult(result, cni_version)`` would print (see module docstring)."""
    legacy = not version_at_least(cni_version, "1.0.0")
    with_11 = version_at_least(cni_version, "1.1.0")
    out: dict[str, Any] = {"cniVersion": cni_version}

    interfaces = []
    for intf in result.interfaces:
        fields = [("mac", intf.mac)]
        if with_11:
            fields.append(("mtu", intf.mtu))
        fields.append(("sandbox", intf.sandbox))
        if with_11:
            fields += [("socketPath", intf.socket_path), ("pciID", intf.pci_id)]
        interfaces.append({"name": intf.name, **_omit_empty(fields)})
    if interfaces:
        out["interfaces"] = interfaces

    ips = []
    for ipc in result.ips:
        entry: dict[str, Any] = {"version": str(ipc.family)} if legacy else {}
        if ipc.interface is not None:
            entry["interface"] = ipc.interface
        entry["address"] = str(ipc.address)
        if ipc.gateway is not None:
            entry["gateway"] = str(ipc.gateway)
        ips.append(entry)
    if ips:
        out["ips"] = ips

    routes = []
    for route in result.routes:
        entry = {"dst": str(route.dst)}
        if route.gw is not None:
            entry["gw"] = str(route.gw)
        if with_11:
            entry.update(_omit_empty([("mtu", route.mtu), ("advmss", route.advmss),
                                      ("priority", route.priority)]))
            entry.update({k: v for k, v in (("table", route.table), ("scope", route.scope))
                          if v is not None})
        routes.append(entry)
    if routes:
        out["routes"] = routes

    dns = _omit_empty([("nameservers", result.dns.nameservers), ("domain", result.dns.domain),
                       ("search", result.dns.search), ("options", result.dns.options)])
    if dns or legacy:
        out["dns"] = dns
    return out
