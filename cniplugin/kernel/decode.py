"""Netlink messages as ``records.facts``/``records.objects`` values: the adapter's only decoders.

``routes`` is the one route decoder, for the engine's filtered dumps (unicast, one Route per next
hop) and the CLI's full ones (any type, legs kept together). ``rule`` reads the engine's lookup
rules from ``kernel.rtnl`` messages; ``full_rule`` reads the CLI's pyroute2 rule dump with every selector.
"""

from __future__ import annotations

import ipaddress

from cniplugin.records.facts import Link
from cniplugin.records.objects import (ROUTE_TYPES, RULE_ACTIONS, SCOPE_NAMES, Route, Rule,
                                      default_dst)
from cniplugin.kernel import rtnl as _rtnl

_FAMILY = _rtnl.FAMILY_OF_AF


def link(msg: _rtnl.Msg) -> Link:
    info = msg.nested(_rtnl.IFLA_LINKINFO)
    kind = info.get(_rtnl.IFLA_INFO_KIND, b"").split(b"\0", 1)[0].decode()
    nsid = msg.i32(_rtnl.IFLA_LINK_NETNSID)
    return Link(index=msg.fields[2], name=msg.text(_rtnl.IFLA_IFNAME), kind=kind,
                mac=msg.mac(_rtnl.IFLA_ADDRESS), up=bool(msg.fields[3] & _rtnl.IFF_UP),
                txqlen=msg.u32(_rtnl.IFLA_TXQLEN, 0), peer_index=msg.u32(_rtnl.IFLA_LINK, 0),
                peer_nsid=-1 if nsid is None else nsid, mtu=msg.u32(_rtnl.IFLA_MTU, 0),
                alias=msg.text(_rtnl.IFLA_IFALIAS))


def routes(msg: _rtnl.Msg, names: dict[int, str], whole: bool = False) -> list[Route]:
    """One route message as Routes: the only route decoder.

    For the engine only unicast routes, a multipath route split into one Route per next hop
    (each leg is what a planned route compares with); ``whole`` (the CLI): any type, the legs
    kept together in ``nexthops``, ``dead`` set.
    """
    rfamily, dst_len, _, _, table, proto, scope, rtype, flags = msg.fields
    family = _FAMILY.get(rfamily)
    if family is None or (rtype != _rtnl.RTN_UNICAST and not whole):
        return []
    dst = msg.ip(_rtnl.RTA_DST)
    if not dst:
        dst = default_dst(family)
    elif family == 4:  # inet_ntop's IPv4 text is canonical, and ipaddress is slow (pod dumps)
        dst = f"{dst}/{dst_len}"
    else:
        dst = str(ipaddress.ip_network(f"{dst}/{dst_len}"))
    base = dict(family=family, table=msg.u32(_rtnl.RTA_TABLE) or table, dst=dst,
                scope=SCOPE_NAMES.get(scope, str(scope)), src=msg.ip(_rtnl.RTA_PREFSRC),
                metric=msg.u32(_rtnl.RTA_PRIORITY, 0), proto=proto)
    legs = msg.attrs.get(_rtnl.RTA_MULTIPATH)
    if legs:
        hops = [(oif, _rtnl.ip_text(a[_rtnl.RTA_GATEWAY]) if a.get(_rtnl.RTA_GATEWAY) else "",
                 hflags) for oif, hflags, a in _rtnl.multipath(legs)]
    else:
        hops = [(msg.u32(_rtnl.RTA_OIF), msg.ip(_rtnl.RTA_GATEWAY), 0)]
    if not whole:
        return [Route(dev=names.get(oif, ""), gateway=gw, **base) for oif, gw, _ in hops if oif]
    dead = bool(flags & _rtnl.RTNH_F_DEAD) or bool(legs) and all(
        f & _rtnl.RTNH_F_DEAD for _, _, f in hops)
    oif = msg.u32(_rtnl.RTA_OIF)
    return [Route(dev=names.get(oif, str(oif)) if oif else "", gateway=msg.ip(_rtnl.RTA_GATEWAY),
                  type=ROUTE_TYPES.get(rtype, str(rtype)), dead=dead,
                  nexthops=tuple((names.get(o, str(o)), gw) for o, gw, _ in hops) if legs
                  else (), **base)]


def rule(msg: _rtnl.Msg) -> Rule:
    rfamily, dst_len, src_len, tos, table, _, _, _, _ = msg.fields
    src = msg.ip(_rtnl.FRA_SRC)
    others = dst_len or tos or bool(msg.attrs.keys() - _KNOWN_FRA)
    return Rule(family=_FAMILY[rfamily], priority=msg.u32(_rtnl.FRA_PRIORITY, 0),
                table=msg.u32(_rtnl.FRA_TABLE) or table,
                src=f"{src}/{src_len}" if src else "", proto=msg.u8(_rtnl.FRA_PROTOCOL, 0),
                fwmark=msg.u32(_rtnl.FRA_FWMARK, 0), fwmask=msg.u32(_rtnl.FRA_FWMASK, 0),
                selectors=bool(others))


_FIB_RULE_INVERT, _FIB_RULE_UNRESOLVED = 0x2, 0x4
_NO_SUPPRESS = 0xFFFFFFFF


def _range(value) -> tuple[int, int] | None:
    # pyroute2 0.9 gives port and uid ranges as "start:end" text (older ones as a dict)
    if not value:
        return None
    if isinstance(value, str):
        start, _, end = value.partition(":")
        return int(start), int(end or start)
    return int(value.get("start")), int(value.get("end"))


def full_rule(msg, family: int) -> Rule:
    """A pyroute2 rule message as a Rule with every selector (``Netlink.all_rules``)."""
    attr = msg.get_attr
    src, dst = attr("FRA_SRC"), attr("FRA_DST")
    other = []
    if msg["tos"]:
        other.append(f"tos {msg['tos']:#x}")
    if attr("FRA_IP_PROTO"):
        other.append(f"ipproto {attr('FRA_IP_PROTO')}")
    for name, word in (("FRA_SPORT_RANGE", "sport"), ("FRA_DPORT_RANGE", "dport")):
        rng = _range(attr(name))
        if rng:
            other.append(f"{word} {rng[0]}-{rng[1]}")
    uid = _range(attr("FRA_UID_RANGE"))
    if uid and uid != (0, 0xFFFFFFFF):
        other.append(f"uidrange {uid[0]}-{uid[1]}")
    if attr("FRA_L3MDEV"):
        other.append("l3mdev")
    mark = attr("FRA_FWMARK") or 0
    mask = attr("FRA_FWMASK")
    suppress = attr("FRA_SUPPRESS_PREFIXLEN")
    dst = f"{dst}/{msg['dst_len']}" if dst else ""
    iif, oif = attr("FRA_IIFNAME") or "", attr("FRA_OIFNAME") or ""
    return Rule(
        family=family, priority=attr("FRA_PRIORITY") or 0,
        action=RULE_ACTIONS.get(msg["action"], f"action{msg['action']}"),
        table=attr("FRA_TABLE") or msg["table"], goto=attr("FRA_GOTO") or 0,
        src=f"{src}/{msg['src_len']}" if src else "", dst=dst, iif=iif, oif=oif,
        fwmark=mark, fwmask=mask if mask is not None else (0xFFFFFFFF if mark else 0),
        invert=bool(msg["flags"] & _FIB_RULE_INVERT),
        unresolved=bool(msg["flags"] & _FIB_RULE_UNRESOLVED),
        suppress_prefixlen=None if suppress in (None, _NO_SUPPRESS, -1) else suppress,
        proto=attr("FRA_PROTOCOL") or 0, other=tuple(other),
        selectors=bool(dst or iif or oif or other))


#: Rule attributes that do not select traffic beyond what ``rule`` records.
_KNOWN_FRA = frozenset({_rtnl.FRA_SRC, _rtnl.FRA_PRIORITY, _rtnl.FRA_TABLE, _rtnl.FRA_FWMARK,
                        _rtnl.FRA_FWMASK, _rtnl.FRA_PROTOCOL})
