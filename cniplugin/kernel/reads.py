"""The read side of a netlink session: kernel state as ``records.facts``/``records.objects``
values, each read a single request with kernel-side filters.

``kernel.netlink.Netlink`` is a ``Reader`` that also writes; this module holds everything a
session reads, and the ifindex lookups its writes share. No reader caches anything beyond its
request (the resident server is long-lived). Every route message, the engine's and the CLI's,
goes through one decoder (``decode.routes``); the CLI's full reads (``all_routes``,
``configured_neighbours``) return the same ``records.objects`` types as the engine's, with their
live-only fields filled.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
from typing import TYPE_CHECKING

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.kernel import netns as _netns
from cniplugin.kernel import rtnl as _rtnl
from cniplugin.kernel import veth as _veth
from cniplugin.kernel.decode import link as _link
from cniplugin.kernel.decode import routes as _routes
from cniplugin.kernel.decode import rule as _rule
from cniplugin.kernel.rtnl import NetlinkError
from cniplugin.protocol.errors import InterfaceNotFound, RouteConflict
from cniplugin.records.facts import Addr, Link
from cniplugin.records.objects import LinkAttr, Neighbour, NftTable, Route, Rule, Sysctl, Veth
from cniplugin.records.values import value

if TYPE_CHECKING:
    from cniplugin.kernel.netlink import Netlink

__all__ = ["Reader", "RouteGet", "owned_rule"]

_AF, _FAMILY = _rtnl.AF_OF_FAMILY, _rtnl.FAMILY_OF_AF
_FULL = {4: 32, 6: 128}
#: Documentation addresses: a FIB-match lookup of one of them finds the default route in use.
_PROBE_DST = {4: "192.0.2.1", 6: "2001:db8::1"}
_RTM_F_FIB_MATCH = 0x2000
_EXT_MASK = _rtnl.attr_u32(_rtnl.IFLA_EXT_MASK, _rtnl.RTEXT_FILTER_SKIP_STATS)
#: How a CHECK reports a route_tune table whose rules are not the ones route-tune writes.
_FOREIGN_NFT = "a different table inet route_tune"


@value
class RouteGet:
    """What ``ip route get`` says: the table really used, the device, next hop and source."""

    table: int
    dev: str
    gateway: str = ""
    prefsrc: str = ""
    local: bool = False           # the destination is an address of this netns


class Reader:
    """One rtnetlink socket bound to netns ``fd`` (None: the thread's current one) for its
    whole life; file reads (sysctls, nftables) enter that netns for the calling thread only
    while they run."""

    def __init__(self, fd: int | None = None) -> None:
        with _netns.entered(fd):
            self.sock = _rtnl.Socket()
        self.fd = fd
        #: The node's session, for objects with an end there (the underlay veth pair).
        self.node: Netlink | None = None
        self._names: dict[int, str] | None = None
        self._indexes: dict[str, int] = {}   # name -> ifindex, positive lookups only

    def close(self) -> None:
        self.sock.close()

    # -- reading ------------------------------------------------------------------------
    def links(self) -> list[Link]:
        msgs = self.sock.dump(_rtnl.RTM_GETLINK, _rtnl.ifinfomsg() + _EXT_MASK)
        links = [_link(m) for m in msgs]
        self._names = {link.index: link.name for link in links}
        self._indexes.update({link.name: link.index for link in links})
        return links

    def link(self, name: str) -> Link | None:
        return self._get_link(_rtnl.ifinfomsg() + _rtnl.attr_str(_rtnl.IFLA_IFNAME, name))

    def link_by_index(self, index: int) -> Link | None:
        return self._get_link(_rtnl.ifinfomsg(index=index))

    def _get_link(self, body: bytes) -> Link | None:
        try:
            link = _link(self.sock.get(_rtnl.RTM_GETLINK, body + _EXT_MASK))
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                return None
            raise
        self._indexes[link.name] = link.index
        return link

    def addresses(self, family: int | None = None, index: int = 0,
                  names: dict[int, str] | None = None) -> list[Addr]:
        """Addresses (kernel-filtered by family and ifindex); names from ``names`` or a dump."""
        records = self.address_records(family, index)
        if names is None:
            names = self._index_names()
        return [Addr(names.get(i, ""), *rest) for i, *rest in records]

    def address_records(self, family: int | None = None,
                        index: int = 0) -> list[tuple[int, int, str, int, bool]]:
        """(ifindex, family, ip, prefixlen, link_local) per address, without names."""
        msgs = self.sock.dump(_rtnl.RTM_GETADDR, _rtnl.ifaddrmsg(_AF.get(family, 0), index=index))
        out = []
        for msg in msgs:
            fam = _FAMILY.get(msg.fields[0])
            raw = msg.attrs.get(_rtnl.IFA_LOCAL) or msg.attrs.get(_rtnl.IFA_ADDRESS)
            if fam is None or not raw:
                continue
            ip = ipaddress.ip_address(raw)
            out.append((msg.fields[4], fam, str(ip), msg.fields[1], ip.is_link_local))
        return out

    def routes(self, family: int | None = None, table: int | None = None,
               proto: int | None = None, dev: str | None = None) -> list[Route]:
        """Unicast routes, filtered by the kernel (family, table, protocol, output device)."""
        body = _route_dump_body(family, table, proto)
        names = None
        if dev is not None:
            found = self._device_filter(dev, _rtnl.RTA_OIF)
            if found is None:
                return []
            body, names = body + found[0], found[1]
        try:
            msgs = self.sock.dump(_rtnl.RTM_GETROUTE, body)
        except NetlinkError as err:
            if err.code == errno.ENOENT:   # the table does not exist (yet): nothing in it
                return []
            raise
        if names is None:
            names = self._index_names()
        out = []
        for msg in msgs:
            out += _routes(msg, names)
        return out

    def all_routes(self, family: int, table: int | None = None) -> list[Route]:
        """Every route of any type (a table's, or all tables'), multipath legs kept together:
        what an operator looks at (the CLI)."""
        body = _rtnl.rtmsg(_AF[family], table=table or 0)
        if table:
            body += _rtnl.attr_u32(_rtnl.RTA_TABLE, table)
        try:
            msgs = self.sock.dump(_rtnl.RTM_GETROUTE, body)
        except NetlinkError as err:
            if err.code == errno.ENOENT:
                return []
            raise
        names = self._index_names()
        return [r for msg in msgs for r in _routes(msg, names, whole=True)]

    def configured_neighbours(self, dev: str | None = None) -> list[Neighbour]:
        """Neighbours someone configured: PERMANENT ones or any carrying a protocol (the CLI)."""
        return self._neighbours(dev, lambda state, proto: state & _rtnl.NUD_PERMANENT or proto,
                                live=True)

    def rules(self, family: int | None = None) -> list[Rule]:
        """Every lookup rule (the kernel cannot filter rule dumps beyond the family)."""
        msgs = self.sock.dump(_rtnl.RTM_GETRULE, _rtnl.fib_rule_hdr(_AF.get(family, 0)))
        return [_rule(m) for m in msgs if m.fields[7] == _rtnl.FR_ACT_TO_TBL
                and m.fields[0] in _FAMILY]

    def owned_rules(self) -> list[Rule]:
        return [owned_rule(r) for r in self.rules() if r.proto == RTPROT_ROUTE_TUNE]

    def owned_neighbours(self, dev: str | None = None) -> list[Neighbour]:
        """Neighbours carrying our protocol (kernel-filtered to ``dev`` when given)."""
        return self._neighbours(dev, lambda state, proto: proto == RTPROT_ROUTE_TUNE)

    def _neighbours(self, dev: str | None, keep, live: bool = False) -> list[Neighbour]:
        # ``live`` fills state and protocol; the engine's compare with planned neighbours
        # leaves them at their defaults (an owned entry is ours whatever its NUD state).
        body, names = _rtnl.ndmsg(), None
        if dev is not None:
            found = self._device_filter(dev, _rtnl.NDA_IFINDEX)
            if found is None:
                return []
            body, names = body + found[0], found[1]
        out = []
        for msg in self.sock.dump(_rtnl.RTM_GETNEIGH, body):
            fam = _FAMILY.get(msg.fields[0])
            state, proto = msg.fields[2], msg.u8(_rtnl.NDA_PROTOCOL, 0)
            if fam is None or not msg.attrs.get(_rtnl.NDA_DST) or not keep(state, proto):
                continue
            if names is None:
                names = self._index_names()
            fields = (fam, names.get(msg.fields[1], ""), msg.ip(_rtnl.NDA_DST),
                      msg.mac(_rtnl.NDA_LLADDR))
            out.append(Neighbour(*fields, bool(state & _rtnl.NUD_PERMANENT), proto) if live
                       else Neighbour(*fields))
        return out

    def route_get(self, dst: str, src: str | None = None, iif: str | None = None,
                  mark: int = 0) -> RouteGet:
        """``ip route get``; ``table`` is the table the rules really selected."""
        family = 6 if ":" in dst else 4
        body = [_rtnl.rtmsg(_AF[family], dst_len=_FULL[family],
                            src_len=_FULL[family] if src else 0,
                            flags=_lookup_flags(family)),
                _rtnl.attr(_rtnl.RTA_DST, _rtnl.ip_bytes(dst))]
        if src:
            body.append(_rtnl.attr(_rtnl.RTA_SRC, _rtnl.ip_bytes(src)))
        if iif:
            body.append(_rtnl.attr_u32(_rtnl.RTA_IIF, self._require_index(iif)))
        if mark:
            body.append(_rtnl.attr_u32(_rtnl.RTA_MARK, mark))
        try:
            msg = self.sock.get(_rtnl.RTM_GETROUTE, b"".join(body))
        except NetlinkError as err:
            raise RouteConflict(f"no route to {dst}" + (f" from {src}" if src else "")
                                + f": {os.strerror(err.code)}") from None
        oif = msg.u32(_rtnl.RTA_OIF)
        return RouteGet(table=msg.u32(_rtnl.RTA_TABLE) or msg.fields[4],
                        dev=self.name_of(oif) if oif else "",
                        gateway=msg.ip(_rtnl.RTA_GATEWAY), prefsrc=msg.ip(_rtnl.RTA_PREFSRC),
                        local=msg.fields[7] == _rtnl.RTN_LOCAL)

    def route_match(self, dst: str) -> tuple[int, str] | None:
        """The route this netns would use for ``dst`` (a FIB-match lookup through the rules):
        ``(prefix length, device)``, or None when nothing routes it."""
        msg = self._fib_match(dst)
        if msg is None:
            return None
        oif = msg.u32(_rtnl.RTA_OIF)
        return msg.fields[1], self.name_of(oif) if oif else ""

    def _fib_match(self, dst: str) -> _rtnl.Msg | None:
        """The route entry that matches ``dst`` through the rules (RTM_F_FIB_MATCH: one message,
        however large the tables are), or None when nothing routes it."""
        family = 6 if ":" in dst else 4
        body = (_rtnl.rtmsg(_AF[family], dst_len=_FULL[family],
                            flags=_lookup_flags(family) | _RTM_F_FIB_MATCH)
                + _rtnl.attr(_rtnl.RTA_DST, _rtnl.ip_bytes(dst)))
        try:
            return self.sock.get(_rtnl.RTM_GETROUTE, body)
        except NetlinkError:
            return None

    def default_gateways(self, family: int) -> list[str]:
        """Gateways of the default route this netns uses (a FIB-match lookup: one message,
        however large the main table is)."""
        msg = self._fib_match(_PROBE_DST[family])
        if msg is None or msg.fields[1] != 0:   # nothing, or a more specific route: no default
            return []
        legs = msg.attrs.get(_rtnl.RTA_MULTIPATH)
        if legs:
            return [_rtnl.ip_text(a[_rtnl.RTA_GATEWAY]) for _, _, a in _rtnl.multipath(legs)
                    if a.get(_rtnl.RTA_GATEWAY)]
        gateway = msg.ip(_rtnl.RTA_GATEWAY)
        return [gateway] if gateway else []

    def node_ns_id(self, node_fd: int) -> int:
        """The id this netns gives the node netns (-1: none assigned)."""
        msg = self.sock.get(_rtnl.RTM_GETNSID,
                            _rtnl.rtgenmsg() + _rtnl.attr_u32(_rtnl.NETNSA_FD, node_fd))
        nsid = msg.i32(_rtnl.NETNSA_NSID, -1)
        return -1 if nsid < 0 else nsid

    def read_attr(self, obj: Sysctl | LinkAttr) -> str | None:
        """The live value of a sysctl or link attribute (None: it does not exist)."""
        if isinstance(obj, Sysctl):
            return self.read_sysctl(obj.path)
        link = self.link(obj.ifname)
        if link is None:
            return None
        return str(link.txqlen) if obj.attr == "txqlen" else link.mac

    def read_sysctl(self, path: str) -> str | None:
        try:
            with _netns.entered(self.fd), open(f"/proc/sys/{path}") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None


    def read_veth(self, name: str) -> Veth | None:
        """The pair whose pod end is ``name`` (``configured`` False if it is not set up)."""
        return _veth.read(self, name)

    def read_nft(self, table: NftTable) -> NftTable | None:
        """route-tune's nftables table: ``table`` when the live one is exactly that, the live
        one marked ``foreign`` when its rules differ, None when there is none."""
        from cniplugin.kernel import nft as _nft
        with _netns.entered(self.fd):
            text = _nft.read_reply_steering()
        if text is None:
            return None
        if text == _nft.expected_reply_steering(table.ifname, table.mark, table.mask):
            return table
        return dataclasses.replace(table, foreign=_FOREIGN_NFT)

    def read(self, obj: Veth | NftTable) -> Veth | NftTable | None:
        """The live counterpart of a whole-object kind (``read_veth``, ``read_nft``)."""
        if isinstance(obj, Veth):
            return self.read_veth(obj.name)
        return self.read_nft(obj)

    # -- ifindex lookups ----------------------------------------------------------------
    def _index_names(self) -> dict[int, str]:
        if self._names is None:
            self.links()
        return self._names

    def name_of(self, index: int) -> str:
        if self._names is not None and index in self._names:
            return self._names[index]
        link = self.link_by_index(index)
        return link.name if link else ""

    def _device_filter(self, dev: str, attr: int) -> tuple[bytes, dict[int, str]] | None:
        """A kernel-side dump filter on ``dev`` (the ``attr`` carrying its ifindex) and the one
        index name the dump then needs; None when ``dev`` does not exist (nothing to dump)."""
        index = self._index(dev)
        if index is None:
            return None
        return _rtnl.attr_u32(attr, index), {index: dev}

    def _index(self, name: str) -> int | None:
        if name not in self._indexes:
            link = self.link(name)
            if link is None:
                return None
        return self._indexes[name]

    def _require_index(self, name: str) -> int:
        index = self._index(name)
        if index is None:
            raise InterfaceNotFound(f"interface {name!r} is gone")
        return index



def owned_rule(r: Rule) -> Rule:
    """A dumped rule as the ``Rule`` object route-tune plans."""
    # fwmask 0xffffffff is what the kernel reports for a plain ``fwmark X`` rule
    return Rule(r.family, r.priority, r.table, r.src, r.proto, r.fwmark,
                r.fwmask if r.fwmark else 0)


def _route_dump_body(family: int | None, table: int | None, proto: int | None) -> bytes:
    # Strict dump filters: table (RTA_TABLE, any size), protocol and type in the header.
    body = _rtnl.rtmsg(_AF.get(family, 0), table=table or 0, proto=proto or 0,
                       rtype=_rtnl.RTN_UNICAST)
    if table:
        body += _rtnl.attr_u32(_rtnl.RTA_TABLE, table)
    return body



def _lookup_flags(family: int) -> int:
    """RTM_GETROUTE flags for "report the table the rules selected".

    IPv4 needs RTM_F_LOOKUP_TABLE for that (else it reports main). IPv6 always reports the real
    table, and its strict request check (NETLINK_GET_STRICT_CHK) refuses any flag but
    RTM_F_FIB_MATCH with EINVAL.
    """
    return _rtnl.RTM_F_LOOKUP_TABLE if family == 4 else 0
