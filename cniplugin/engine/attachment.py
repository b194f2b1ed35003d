"""What is being attached: the interface's addresses and gateways, as prevResult (or, failing
that, the pod itself) describes them (design.md "Names")."""

from __future__ import annotations

import ipaddress

from cniplugin.protocol.errors import InvalidConfig
from cniplugin.records.facts import PodFacts
from cniplugin.records.values import value


@value
class Attachment:
    """The interface being attached, as the previous plugins described it."""

    container_id: str
    ifname: str
    network: str = ""
    addresses: tuple[str, ...] = ()   # "ip/prefix", in prevResult order
    gateways: tuple[str, ...] = ()    # at most one per family
    mac: str = ""                     # MAC to set from podMACPrefix ("" = leave as is)

    def addresses_of(self, family: int) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        return [a for a in map(ipaddress.ip_interface, self.addresses) if a.version == family]

    def gateway_of(self, family: int) -> str:
        return next((g for g in self.gateways if ipaddress.ip_address(g).version == family), "")

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted({ipaddress.ip_interface(a).version for a in self.addresses}))


def attachment_from_result(result, ifname: str, container_id: str, network: str,
                           pod: PodFacts, mac: str = "") -> Attachment:
    """netK's addresses and gateways, from prevResult (design.md "Names")."""
    interfaces = list(getattr(result, "interfaces", None) or [])
    index = next((i for i, itf in enumerate(interfaces) if itf.name == ifname), None)
    addresses: list[str] = []
    gateways: dict[int, str] = {}
    for ip in getattr(result, "ips", None) or []:
        owner = ip.interface
        if owner is not None and 0 <= owner < len(interfaces) and owner != index:
            continue  # sbr semantics: no interface, or out of range, counts as ours
        address = ipaddress.ip_interface(str(ip.address))
        addresses.append(str(address))
        if ip.gateway:
            gateway = ipaddress.ip_address(str(ip.gateway))
            if gateway.version != address.version:
                raise InvalidConfig(
                    f"prevResult: address {address} of {ifname} has gateway {gateway} of the "
                    f"other family")
            gateways.setdefault(gateway.version, str(gateway))
    if not addresses:
        # SLAAC and other post-IPAM addresses: what is really on the link counts.
        addresses = [a.cidr for a in pod.addrs_of(ifname)]
    networks = [ipaddress.ip_interface(a).network for a in addresses]
    for route in getattr(result, "routes", None) or []:
        dst = ipaddress.ip_network(str(route.dst), strict=False)
        gw = str(route.gw) if route.gw else ""
        if dst.prefixlen == 0 and gw and any(ipaddress.ip_address(gw) in n for n in networks):
            gateways.setdefault(dst.version, gw)
    for family in (4, 6):
        if family not in gateways:
            default = next((r for r in pod.main_routes_of(ifname, family)
                            if r.is_default and r.gateway), None)
            if default:
                gateways[family] = default.gateway
    return Attachment(container_id=container_id, ifname=ifname, network=network,
                      addresses=tuple(addresses),
                      gateways=tuple(gateways[f] for f in sorted(gateways)), mac=mac)
