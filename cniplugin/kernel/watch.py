"""Watching a netns for changes to the kinds of objects route-tune installs (stdlib only).

A ``Watch`` holds two sockets, created in the calling thread's netns:

- rtnetlink, joined to the multicast groups of links, neighbours, and both families' routes and
  rules (``setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP)``: the legacy bind mask cannot reach
  group 19, IPv6 rules);
- netfilter, joined to ``NFNLGRP_NFTABLES`` with ``NETLINK_LISTEN_ALL_NSID``: it also hears the
  nftables changes of every netns this one has an id for (``ensure_peer_id``), so the pods'
  reply-steering tables are watched without a socket inside any pod (a socket would keep a
  deleted pod's netns, and its interfaces, alive).

``wait`` decodes only what deciding needs (``Change``). A receive buffer overrun (``ENOBUFS``)
means events were lost: ``wait`` returns None and the caller resyncs from a full read.
"""

from __future__ import annotations

import errno
import select
import socket
import struct

from cniplugin.kernel import rtnl as _rtnl
from cniplugin.records.values import value

__all__ = ["Change", "Watch", "ensure_peer_id"]

NETLINK_ADD_MEMBERSHIP = 1
NETLINK_LISTEN_ALL_NSID = 8
NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
RTNLGRP_LINK, RTNLGRP_NEIGH = 1, 3
RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE = 7, 8
RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE = 11, 19
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE = 2, 5, 8
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 3, 6
NFTA_TABLE_NAME = 1          # also NFTA_CHAIN_TABLE and NFTA_RULE_TABLE: the table's name

_GROUPS = (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE,
           RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE)
_RCVBUF = 8 << 20            # a networkd flush of thousands of routes fits; ENOBUFS still handled
_BUFSIZE = 1 << 16
_MAX_READS = 1024            # per wait: a storm of events cannot hold the caller forever
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG_LEN = 4
_NFT_TYPES = {NFT_MSG_NEWTABLE: False, NFT_MSG_NEWCHAIN: False, NFT_MSG_NEWRULE: False,
              NFT_MSG_DELTABLE: True, NFT_MSG_DELCHAIN: True, NFT_MSG_DELRULE: True}
_RT_KINDS = {_rtnl.RTM_NEWLINK: ("link", False), _rtnl.RTM_DELLINK: ("link", True),
             _rtnl.RTM_NEWROUTE: ("route", False), _rtnl.RTM_DELROUTE: ("route", True),
             _rtnl.RTM_NEWRULE: ("rule", False), _rtnl.RTM_DELRULE: ("rule", True),
             _rtnl.RTM_NEWNEIGH: ("neighbour", False), _rtnl.RTM_DELNEIGH: ("neighbour", True)}


@value
class Change:
    """One announced change: what kind of object, whether it went away, and what identifies
    it well enough to decide whether it is route-tune's."""

    kind: str           # link | route | rule | neighbour | nft
    removed: bool       # a deletion (RTM_DEL*, NFT_MSG_DEL*); else created or replaced
    family: int = 0     # 4 | 6 (0: not an IP object)
    table: int = 0      # route, rule
    proto: int = 0      # route, rule, neighbour (0: not given)
    name: str = ""      # link name; nft table name


class Watch:
    """The two multicast sockets of the calling thread's netns (see the module docstring)."""

    def __init__(self) -> None:
        self._socks: list[socket.socket] = []
        try:
            self.rtnl = self._open(socket.NETLINK_ROUTE, _GROUPS)
            self.nft = self._open(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))
            self.nft.setsockopt(_rtnl.SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
        except BaseException:
            self.close()
            raise
        self._buf = bytearray(_BUFSIZE)

    def _open(self, protocol: int, groups: tuple[int, ...]) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC |
                             socket.SOCK_NONBLOCK, protocol)
        self._socks.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
        except PermissionError:  # without CAP_NET_ADMIN: as large as rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(_rtnl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        return sock

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def wait(self, timeout: float, wake_fd: int | None = None) -> list[Change] | None:
        """The changes announced within ``timeout`` seconds (returns as soon as there are any,
        or when ``wake_fd`` becomes readable); None when events were lost (resync)."""
        poller = select.poll()
        for sock in self._socks:
            poller.register(sock.fileno(), select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        try:
            poller.poll(max(0, int(timeout * 1000)))
        except InterruptedError:
            return []
        changes: list[Change] = []
        for sock, decode in ((self.rtnl, _rt_changes), (self.nft, _nft_changes)):
            for _ in range(_MAX_READS):
                try:
                    size = sock.recv_into(self._buf, _BUFSIZE)
                except BlockingIOError:
                    break
                except OSError as err:
                    if err.errno == errno.ENOBUFS:
                        self._drain()
                        return None
                    raise
                changes += decode(bytes(self._buf[:size]))
        return changes

    def _drain(self) -> None:
        """Throw away what is queued: the resync that follows reads the kernel afresh."""
        for sock in self._socks:
            for _ in range(_MAX_READS):
                try:
                    sock.recv_into(self._buf, _BUFSIZE)
                except (BlockingIOError, OSError):
                    break


def _messages(data: bytes):
    offset = 0
    while offset + 16 <= len(data):
        length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < 16:
            return
        yield mtype, offset + 16, offset + length
        offset += (length + 3) & ~3


def _rt_changes(data: bytes) -> list[Change]:
    out = []
    for mtype, start, end in _messages(data):
        kind_removed = _RT_KINDS.get(mtype)
        header = _rtnl.header_of(mtype)
        if kind_removed is None or header is None or start + header.size > end:
            continue
        kind, removed = kind_removed
        fields = header.unpack_from(data, start)
        msg = _rtnl.Msg(mtype, fields, _rtnl.parse_attrs(
            data, start + ((header.size + 3) & ~3), end))
        family = _rtnl.FAMILY_OF_AF.get(fields[0], 0)
        if kind == "link":
            out.append(Change("link", removed, name=msg.text(_rtnl.IFLA_IFNAME)))
        elif kind == "route":   # family, dst_len, src_len, tos, table, proto, ...
            out.append(Change("route", removed, family, msg.u32(_rtnl.RTA_TABLE, fields[4]),
                              fields[5]))
        elif kind == "rule":    # family, dst_len, src_len, tos, table, ...
            out.append(Change("rule", removed, family, msg.u32(_rtnl.FRA_TABLE, fields[4]),
                              msg.u8(_rtnl.FRA_PROTOCOL, 0)))
        else:
            out.append(Change("neighbour", removed, family,
                              proto=msg.u8(_rtnl.NDA_PROTOCOL, 0)))
    return out


def _nft_changes(data: bytes) -> list[Change]:
    out = []
    for mtype, start, end in _messages(data):
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES or (mtype & 0xFF) not in _NFT_TYPES:
            continue
        attrs = _rtnl.parse_attrs(data, start + _NFGENMSG_LEN, end)
        name = attrs.get(NFTA_TABLE_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
        out.append(Change("nft", _NFT_TYPES[mtype & 0xFF], name=name))
    return out


def ensure_peer_id(netns_fd: int) -> None:
    """Give the netns ``netns_fd`` an id in the calling thread's netns if it has none, so a
    ``Watch`` here hears its nftables changes (ids die with their netns; nothing to undo)."""
    sock = _rtnl.Socket()
    try:
        sock.change(_rtnl.RTM_NEWNSID, 0, _rtnl.rtgenmsg() +
                    _rtnl.attr_u32(_rtnl.NETNSA_FD, netns_fd) + _rtnl.attr_i32(_rtnl.NETNSA_NSID, -1))
    except _rtnl.NetlinkError as err:
        if err.code != errno.EEXIST:
            raise
    finally:
        sock.close()
