"""The netlink adapter: a ``Netlink`` session reads (``kernel.reads``), applies, removes and
restores ``records.objects`` values in one netns.

A session owns one rtnetlink socket (``kernel.rtnl``) bound to one netns for its whole life,
whatever netns the calling thread is in later; file-based work (sysctls, nftables) enters that
netns for the calling thread only while it runs. ``Netlink.bound_to(fd)`` leaves the calling
thread where it is; ``Netlink.entered(fd)`` also moves the thread into the netns for the body
(for callers that open raw sockets or read ``/proc`` there alongside). The engine opens one
session per netns per request and uses it throughout.

This is the only module that imports pyroute2: lazily, for the CLI's full rule dump
(``all_rules``; the engine never touches it). docs/design.md ("Netlink paths") says why each
path exists.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from collections.abc import Iterator

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.kernel import netns as _netns
from cniplugin.kernel import rtnl as _rtnl
from cniplugin.kernel import veth as _veth
from cniplugin.kernel.decode import full_rule as _full_rule
from cniplugin.kernel.reads import Reader, owned_rule
from cniplugin.kernel.rtnl import GONE, NetlinkError
from cniplugin.protocol.errors import RouteConflict
from cniplugin.records.objects import (SCOPE_NUMBERS, KernelObject, LinkAttr, Neighbour, NftTable,
                                       Route, Rule, Sysctl, Veth)

__all__ = ["Netlink"]

_AF = _rtnl.AF_OF_FAMILY


def _rule_body(rule: Rule) -> bytes:
    # Explicit priority and family on add AND del, so a delete can only match this rule.
    src_len = int(rule.src.partition("/")[2]) if rule.src else 0
    parts = [_rtnl.fib_rule_hdr(_AF[rule.family], src_len, rule.table, _rtnl.FR_ACT_TO_TBL),
             _rtnl.attr_u32(_rtnl.FRA_PRIORITY, rule.priority),
             _rtnl.attr_u32(_rtnl.FRA_TABLE, rule.table),
             _rtnl.attr(_rtnl.FRA_PROTOCOL, bytes([rule.proto]))]
    if rule.src:
        parts.append(_rtnl.attr(_rtnl.FRA_SRC, _rtnl.ip_bytes(rule.src.partition("/")[0])))
    if rule.fwmark:
        parts += [_rtnl.attr_u32(_rtnl.FRA_FWMARK, rule.fwmark),
                  _rtnl.attr_u32(_rtnl.FRA_FWMASK, rule.fwmask)]
    return b"".join(parts)


class Netlink(Reader):
    """A session in one netns: everything ``Reader`` reads, and the writes."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__(fd)
        self._ipr = None

    @classmethod
    @contextlib.contextmanager
    def bound_to(cls, fd: int) -> Iterator[Netlink]:
        """A session bound to netns ``fd``; the calling thread stays where it is."""
        nl = cls(fd)
        try:
            yield nl
        finally:
            nl.close()

    @classmethod
    @contextlib.contextmanager
    def entered(cls, fd: int | None) -> Iterator[Netlink]:
        """The calling thread enters netns ``fd`` (None: stays in its current one) for the
        body, with a session there."""
        with _netns.entered(fd), cls.bound_to(fd) as nl:
            yield nl

    def close(self) -> None:
        super().close()
        if self._ipr is not None:
            self._ipr.close()

    @property
    def ipr(self):
        """A pyroute2 ``IPRoute`` in this session's netns, opened on first use (CLI only)."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            with _netns.entered(self.fd):
                self._ipr = IPRoute(strict_check=True)
        return self._ipr

    def all_rules(self, family: int) -> list[Rule]:
        """Every rule with every selector and action (the CLI's view), through pyroute2: its
        generic attribute decoding names the long tail of selectors (port and uid ranges,
        ipproto, l3mdev) that the engine never needs."""
        return [_full_rule(m, family) for m in self.ipr.rule("dump", family=_AF[family])]

    # -- writing ------------------------------------------------------------------------
    def apply(self, obj: KernelObject) -> None:
        """Install ``obj``; converges when it (or the identical object) is already there."""
        try:
            if isinstance(obj, Rule):
                self._rule_add(obj)
            elif isinstance(obj, Route):
                self.sock.change(_rtnl.RTM_NEWROUTE, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_REPLACE,
                                 self._route_body(obj))
            elif isinstance(obj, Neighbour):
                self.sock.change(_rtnl.RTM_NEWNEIGH, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_REPLACE,
                                 self._neigh_body(obj, self._require_index(obj.dev), True))
            elif isinstance(obj, Sysctl):
                self.write_sysctl(obj.path, obj.value)
            elif isinstance(obj, LinkAttr):
                self._link_set(obj, obj.value)
            elif isinstance(obj, Veth):
                _veth.apply(self, obj)
            elif isinstance(obj, NftTable):
                from cniplugin.kernel import nft as _nft
                with _netns.entered(self.fd):
                    _nft.ensure_reply_steering(obj.ifname, obj.mark, obj.mask)
        except NetlinkError as err:
            raise _rtnl.refused(obj, err) from None

    def create_route(self, route: Route) -> Route | None:
        """Add ``route`` where the request saw nothing with its key (table, prefix, metric).

        If something does hold the key, a route of ours (moved elsewhere, or left by an older
        attachment with the same address) is replaced and returned, so a rollback can put it
        back; a foreign route is never overwritten: RouteConflict (code 103).
        """
        try:
            self.sock.change(_rtnl.RTM_NEWROUTE, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_EXCL,
                             self._route_body(route))
            return None
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise _rtnl.refused(route, err) from None
        holder = next((r for r in self.routes(route.family, route.table)
                       if r.key() == route.key()), None)
        if holder is not None and holder.proto != RTPROT_ROUTE_TUNE:
            raise RouteConflict(
                f"table {route.table} already has a route to {route.dst} that route-tune did "
                f"not install (`{holder.render()}`, protocol {holder.proto}); route-tune never "
                f"overwrites it: remove it, or choose another table (hostRuleTable) or address")
        self.apply(route)
        return holder

    def remove(self, obj: KernelObject) -> None:
        """Delete ``obj`` exactly (explicit priority, family, device, protocol); gone is fine."""
        try:
            if isinstance(obj, Rule):
                self.sock.change(_rtnl.RTM_DELRULE, 0, _rule_body(obj))
            elif isinstance(obj, Route):
                if self._index(obj.dev) is not None:
                    self.sock.change(_rtnl.RTM_DELROUTE, 0, self._route_body(obj))
            elif isinstance(obj, Neighbour):
                index = self._index(obj.dev)
                if index is not None:
                    self.sock.change(_rtnl.RTM_DELNEIGH, 0, self._neigh_body(obj, index, False))
            elif isinstance(obj, Veth):
                index = self._index(obj.name)
                if index is not None:  # deleting one end deletes the pair (and its routes)
                    self.sock.change(_rtnl.RTM_DELLINK, 0, _rtnl.ifinfomsg(index=index))
                    self._indexes.pop(obj.name, None)
            elif isinstance(obj, NftTable):
                from cniplugin.kernel import nft as _nft
                with _netns.entered(self.fd):
                    _nft.remove_reply_steering()
        except NetlinkError as err:
            if err.code not in GONE:
                raise _rtnl.refused(obj, err, "remove") from None

    def remove_veth_peer(self, veth: Veth) -> bool:
        """Delete the node end of ``veth`` (a node session), only if its alias names the same
        container: the DEL path when the pod cannot be reached. True when it was deleted."""
        return _veth.remove_peer(self, veth)

    def restore(self, obj: KernelObject, original=None) -> None:
        """Put back a displaced foreign route, or an original sysctl/link value/veth."""
        try:
            if isinstance(obj, Route):
                if self._index(obj.dev) is not None:
                    self.sock.change(_rtnl.RTM_NEWROUTE, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_EXCL,
                                     self._route_body(obj))
            elif isinstance(obj, Sysctl) and original is not None:
                self.write_sysctl(obj.path, original)
            elif isinstance(obj, LinkAttr) and original is not None:
                if self._index(obj.ifname) is not None:
                    self._link_set(obj, original)
            elif isinstance(obj, Veth) and isinstance(original, Veth):
                _veth.apply(self, original)
        except FileNotFoundError:
            pass  # the interface (and its sysctls) went away: nothing to restore
        except NetlinkError as err:
            if err.code not in (*GONE, errno.EEXIST, errno.ENETUNREACH):
                raise _rtnl.refused(obj, err, "restore") from None

    # -- request bodies and small writes ------------------------------------------------
    def write_sysctl(self, path: str, value: str) -> None:
        with _netns.entered(self.fd), open(f"/proc/sys/{path}", "w") as f:
            f.write(value)

    def _route_body(self, route: Route) -> bytes:
        family = _AF[route.family]
        net = ipaddress.ip_network(route.dst)
        scope = SCOPE_NUMBERS.get(route.scope, 0) if route.family == 4 else 0
        parts = [_rtnl.rtmsg(family, dst_len=net.prefixlen, table=route.table,
                             proto=route.proto, scope=scope, rtype=_rtnl.RTN_UNICAST),
                 _rtnl.attr_u32(_rtnl.RTA_TABLE, route.table),
                 _rtnl.attr_u32(_rtnl.RTA_OIF, self._require_index(route.dev))]
        if net.prefixlen:
            parts.append(_rtnl.attr(_rtnl.RTA_DST, net.network_address.packed))
        if route.gateway:
            parts.append(_rtnl.attr(_rtnl.RTA_GATEWAY, _rtnl.ip_bytes(route.gateway)))
        if route.src:
            parts.append(_rtnl.attr(_rtnl.RTA_PREFSRC, _rtnl.ip_bytes(route.src)))
        if route.metric:
            parts.append(_rtnl.attr_u32(_rtnl.RTA_PRIORITY, route.metric))
        return b"".join(parts)

    @staticmethod
    def _neigh_body(neigh: Neighbour, index: int, full: bool) -> bytes:
        parts = [_rtnl.ndmsg(_AF[neigh.family], index, _rtnl.NUD_PERMANENT if full else 0),
                 _rtnl.attr(_rtnl.NDA_DST, _rtnl.ip_bytes(neigh.ip))]
        if full:
            parts += [_rtnl.attr(_rtnl.NDA_LLADDR, _rtnl.mac_bytes(neigh.lladdr)),
                      _rtnl.attr(_rtnl.NDA_PROTOCOL, bytes([RTPROT_ROUTE_TUNE]))]
        return b"".join(parts)

    def _rule_add(self, rule: Rule) -> None:
        try:
            self.sock.change(_rtnl.RTM_NEWRULE, _rtnl.NLM_F_CREATE | _rtnl.NLM_F_EXCL,
                             _rule_body(rule))
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
            live = [owned_rule(r) for r in self.rules(rule.family) if not r.selectors]
            if rule not in live:
                raise RouteConflict(
                    f"`{rule.render()}` collides with an existing rule that is not "
                    f"route-tune's; remove that rule or change hostRulePriority") from None

    def _link_set(self, attr: LinkAttr, value: str) -> None:
        index = self._require_index(attr.ifname)
        if attr.attr == "txqlen":
            payload = _rtnl.attr_u32(_rtnl.IFLA_TXQLEN, int(value))
        else:
            payload = _rtnl.attr(_rtnl.IFLA_ADDRESS, _rtnl.mac_bytes(value))
        self.sock.change(_rtnl.RTM_NEWLINK, 0, _rtnl.ifinfomsg(index=index) + payload)

    def set_link(self, index: int, *attrs: bytes, up: bool = False) -> None:
        """Set link attributes (``rtnl.attr`` payloads) of link ``index``; ``up`` also sets it up."""
        flags = _rtnl.IFF_UP if up else 0
        self.sock.change(_rtnl.RTM_NEWLINK, 0,
                         _rtnl.ifinfomsg(index=index, flags=flags, change=flags) + b"".join(attrs))
