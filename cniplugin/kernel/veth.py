"""The underlay veth pair (pod end ``veth0``, node end ``rt<container id>``): read, create or
repair, and delete the node end alone; and the one check that a pod veth's peer is on the node.
Called by the ``kernel.netlink`` session for ``Veth`` objects, with the pod's session (``nl``;
``nl.node`` is the node's).
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from cniplugin.kernel import rtnl as _rtnl
from cniplugin.kernel.rtnl import GONE, NetlinkError
from cniplugin.protocol.errors import RouteConflict
from cniplugin.records.facts import Link
from cniplugin.records.objects import Veth

if TYPE_CHECKING:
    from cniplugin.kernel.netlink import Netlink
    from cniplugin.kernel.reads import Reader


def verified_peer(node: Reader, pod_link: Link, node_nsid_in_pod: int) -> Link | None:
    """The node end of the pod veth ``pod_link`` (read through the node's session ``node``), or
    None unless all three ties hold: pod_link is a veth, its IFLA_LINK names a node veth whose
    IFLA_LINK is pod_link, and pod_link's link-netnsid is the node netns (an index alone could
    name a link of any other netns)."""
    if pod_link.kind != "veth" or not pod_link.peer_index \
            or pod_link.peer_nsid != node_nsid_in_pod:
        return None
    peer = node.link_by_index(pod_link.peer_index)
    if peer is None or peer.kind != "veth" or peer.peer_index != pod_link.index:
        return None
    return peer


def _node_peer(nl: Reader, link: Link) -> Link | None:
    """``verified_peer`` of the pod link ``link`` through the pod session's node session."""
    if nl.node is None or link.kind != "veth":
        return None
    return verified_peer(nl.node, link, nl.node_ns_id(nl.node.fd))


def read(nl: Reader, name: str) -> Veth | None:
    """The pair whose pod end is ``name``, as a Veth (``configured`` False if it is not)."""
    link = nl.link(name)
    if link is None:
        return None
    peer = _node_peer(nl, link)
    if peer is None:
        return Veth(name, "", link.mtu, link.mac, "", configured=False)
    address = next((f"{a.address}/32" for a in nl.addresses(4, link.index, {})
                    if a.prefixlen == 32), "")
    accept_ra = nl.node.read_sysctl(f"net/ipv6/conf/{peer.name}/accept_ra")
    configured = (link.up and peer.up and peer.mtu == link.mtu
                  and accept_ra in ("0", None))
    return Veth(name, peer.name, link.mtu, link.mac, peer.mac, address, peer.alias,
                configured)


def apply(nl: Netlink, veth: Veth) -> None:
    """Create (or repair) the pair: the node end is configured before it goes up, so it
    never accepts a router advertisement from the pod (accept_ra=0 on that link only)."""
    node = nl.node
    if node is None or node.fd is None:
        raise RuntimeError("a veth needs the node's session (Netlink.node)")
    live = nl.link(veth.name)
    if live is None:
        _create(nl, veth)
        live = nl.link(veth.name)
    elif live.kind != "veth":
        kind = live.kind or "no kind"
        raise RouteConflict(f"{veth.name} exists in the pod and is not a veth ({kind}); "
                            f"underlay mode needs that name for its veth pair")
    peer = _node_peer(nl, live)
    if peer is None or peer.name != veth.peer:
        raise RouteConflict(
            f"the node end {veth.peer!r} of {veth.name} is missing or is another pod's "
            f"link (node link names use the first 11 characters of the container id)")
    try:
        node.write_sysctl(f"net/ipv6/conf/{veth.peer}/accept_ra", "0")
    except FileNotFoundError:
        pass  # IPv6 is disabled on the node: no router advertisement to refuse
    node.set_link(peer.index, _rtnl.attr_u32(_rtnl.IFLA_MTU, veth.mtu),
                  _rtnl.attr(_rtnl.IFLA_IFALIAS, veth.alias.encode()),  # no NUL: as ip(8)
                  up=True)
    if veth.address:
        ip, _, length = veth.address.partition("/")
        nl.sock.change(_rtnl.RTM_NEWADDR, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_REPLACE,
                       _rtnl.ifaddrmsg(socket.AF_INET, int(length), live.index)
                       + _rtnl.attr(_rtnl.IFA_LOCAL, _rtnl.ip_bytes(ip))
                       + _rtnl.attr(_rtnl.IFA_ADDRESS, _rtnl.ip_bytes(ip)))
    nl.set_link(live.index, _rtnl.attr_u32(_rtnl.IFLA_MTU, veth.mtu), up=True)


def _create(nl: Netlink, veth: Veth) -> None:
    peer = (_rtnl.ifinfomsg() + _rtnl.attr_str(_rtnl.IFLA_IFNAME, veth.peer)
            + _rtnl.attr_u32(_rtnl.IFLA_MTU, veth.mtu)
            + _rtnl.attr(_rtnl.IFLA_ADDRESS, _rtnl.mac_bytes(veth.peer_mac))
            + _rtnl.attr_u32(_rtnl.IFLA_NET_NS_FD, nl.node.fd))
    info = (_rtnl.attr_str(_rtnl.IFLA_INFO_KIND, "veth")
            + _rtnl.attr(_rtnl.IFLA_INFO_DATA, _rtnl.attr(_rtnl.VETH_INFO_PEER, peer)))
    body = (_rtnl.ifinfomsg() + _rtnl.attr_str(_rtnl.IFLA_IFNAME, veth.name)
            + _rtnl.attr_u32(_rtnl.IFLA_MTU, veth.mtu)
            + _rtnl.attr(_rtnl.IFLA_ADDRESS, _rtnl.mac_bytes(veth.mac))
            + _rtnl.attr(_rtnl.IFLA_LINKINFO, info))
    try:
        nl.sock.change(_rtnl.RTM_NEWLINK, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_EXCL, body)
    except NetlinkError as err:
        if err.code == errno.EEXIST:
            raise RouteConflict(
                f"cannot create the veth pair {veth.name}/{veth.peer}: the node already has "
                f"a link named {veth.peer!r} (another container whose id starts with the "
                f"same 11 characters?)") from None
        raise


def remove_peer(node: Netlink, veth: Veth) -> bool:
    """Delete the node end of ``veth`` (a node session), only if its alias proves it is
    ours: the DEL path when the pod cannot be reached. True when something was deleted."""
    link = node.link(veth.peer)
    if link is None or link.kind != "veth" or not veth.alias or link.alias != veth.alias:
        return False
    try:
        node.sock.change(_rtnl.RTM_DELLINK, 0, _rtnl.ifinfomsg(index=link.index))
    except NetlinkError as err:
        if err.code not in GONE:
            raise _rtnl.refused(veth, err, "remove") from None
    return True
