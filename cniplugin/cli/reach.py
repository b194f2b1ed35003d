"""The paths behind ``reach``: per rail, the kernel's route to a peer from that rail's address,
the unbound choice beside them, and whether the peer answers over each path.

A path is the kernel's own lookup (``route get``, through the pod's policy rules), then an ICMP
echo sent from the pod exactly as an application would send it (bound to the rail's address,
or unbound). A path is good when the peer answers and the reply arrives on the interface the
request left by: a reply on another interface is the asymmetry route-tune exists to prevent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cniplugin.kernel import echo as _echo
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns
from cniplugin.kernel.reads import RouteGet
from cniplugin.protocol.errors import InterfaceNotFound, RouteConflict


@dataclass
class Path:
    """One flow to the peer: from ``rail``'s address (``bound``) or the kernel's choice."""

    rail: str                       # the interface whose address is the source ("" unbound)
    source: str                     # the bound source, or the one the kernel picks
    bound: bool
    route: RouteGet | None = None
    route_error: str = ""
    echo: _echo.EchoResult | None = None
    reply_dev: str = ""

    @property
    def problem(self) -> str:
        """What is wrong with this path ("" when the peer answered over it)."""
        if self.route is None:
            return self.route_error
        if self.echo is None or not self.echo.answered:
            return self.echo.error if self.echo else "not probed"
        if self.reply_dev != self.route.dev:
            return f"the reply arrived on {self.reply_dev or '?'}, not on {self.route.dev}"
        return ""


@dataclass
class Reach:
    """Every path to ``peer`` from one pod netns."""

    netns: str
    peer: str
    family: int
    paths: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not p.problem for p in self.paths)


def _rails(nl, links: dict[int, str], family: int, default_nic: str,
           ifname: str) -> list[tuple[str, str]]:
    """(interface, address) of the family per rail: every link (``links``: index -> name) but
    lo and the pod's default NIC, or just ``ifname``; in interface order."""
    if ifname and ifname not in links.values():
        raise InterfaceNotFound(f"no interface {ifname} in the pod netns")
    order = {name: index for index, name in links.items()}
    wanted = {ifname} if ifname else set(links.values()) - {"lo", default_nic}
    addrs = [a for a in nl.addresses(family, names=links)
             if a.ifname in wanted and not a.link_local]
    if ifname and not addrs:
        raise InterfaceNotFound(f"{ifname} has no IPv{family} address to send from")
    return [(a.ifname, a.address)
            for a in sorted(addrs, key=lambda a: (order[a.ifname], ipaddress.ip_address(a.address)))]


def reach(pod_fd: int, netns: str, peer: str, *, default_nic: str = "eth0", ifname: str = "",
          attempts: int = 3, timeout: float = 1.0) -> Reach:
    """The paths to ``peer`` from every rail's address (or ``ifname``'s), and unbound."""
    family = ipaddress.ip_address(peer).version
    out = Reach(netns, peer, family)
    with _netlink.Netlink.entered(pod_fd) as nl:
        names = {link.index: link.name for link in nl.links()}
        rails = _rails(nl, names, family, default_nic, ifname)
        out.paths = [Path(rail, address, True) for rail, address in rails] + [Path("", "", False)]
        for path in out.paths:
            try:
                path.route = nl.route_get(peer, path.source if path.bound else None)
            except RouteConflict as err:
                path.route_error = err.msg
            else:
                path.source = path.source or path.route.prefsrc
    probed = [p for p in out.paths if p.route is not None]
    with _netns.entered(pod_fd):
        results = _echo.echo_all([(p.source if p.bound else "", peer) for p in probed],
                                 attempts=attempts, timeout=timeout)
    for path, result in zip(probed, results):
        path.echo = result
        path.reply_dev = names.get(result.reply_ifindex, "") if result.answered else ""
    return out
