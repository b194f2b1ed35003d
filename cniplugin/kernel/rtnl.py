"""A small rtnetlink client (stdlib only): exactly the messages route-tune sends and reads.

Why not pyroute2 for the hot path: there every request runs an asyncio loop, decodes every
attribute of every message and applies dump filters in user space after the kernel sent
everything. Here a request is one send and one receive, only the attributes asked for are
decoded, and dumps carry kernel-side filters (``NETLINK_GET_STRICT_CHK``: table, protocol,
output device, ifindex), so 5,000 foreign routes in a node table are skipped by the kernel.
``kernel.reads``, ``kernel.netlink`` and ``kernel.veth`` use it; ``decode`` maps these raw
messages to ``records.facts``/``records.objects``.

A ``Socket`` is bound to the netns the calling thread is in when it is created and stays there.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

# -- protocol constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, ...) ----------
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200            # on an NLMSG_ERROR: extended-ack TLVs follow
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_GETNSID = 90

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK = 1, 3, 4, 5
IFLA_TXQLEN, IFLA_LINKINFO, IFLA_IFALIAS = 13, 18, 20
IFLA_NET_NS_FD, IFLA_EXT_MASK, IFLA_LINK_NETNSID = 28, 29, 37
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1

IFA_ADDRESS, IFA_LOCAL = 1, 2

RTA_DST, RTA_SRC, RTA_IIF, RTA_OIF, RTA_GATEWAY = 1, 2, 3, 4, 5
RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE, RTA_MARK = 6, 7, 9, 15, 16
RTM_F_LOOKUP_TABLE = 0x1000
RTN_UNICAST, RTN_LOCAL = 1, 2
RTNH_F_DEAD = 0x1

FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK = 2, 3, 6, 10
FRA_TABLE, FRA_FWMASK, FRA_OIFNAME, FRA_PROTOCOL = 15, 16, 17, 21
FR_ACT_TO_TBL = 1

NDA_DST, NDA_LLADDR, NDA_PROTOCOL, NDA_IFINDEX = 1, 2, 12, 8
NUD_PERMANENT = 0x80

NETNSA_NSID, NETNSA_FD = 1, 3

#: Errors that mean the object (or its link, or its netns) is already gone: a removal is done.
GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV)

AF_UNSPEC, AF_INET, AF_INET6 = 0, socket.AF_INET, socket.AF_INET6
#: IP version (4, 6) <-> address family, for every module speaking rtnetlink.
AF_OF_FAMILY = {4: AF_INET, 6: AF_INET6}
FAMILY_OF_AF = {AF_INET: 4, AF_INET6: 6}

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")      # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")       # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")       # family, dst_len, src_len, tos, table, proto, scope,
                                           # type, flags
_FIBRULEHDR = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2,
                                           # action, flags
_NDMSG = struct.Struct("=BxxxiHBB")        # family, ifindex, state, flags, type
_RTGENMSG = struct.Struct("=Bxxx")
_RTNEXTHOP = struct.Struct("=HBBi")        # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
RTM_NEWNSID = 88
#: reply type -> its fixed header (replies to gets and dumps are always RTM_NEW*)
_HEADERS = {RTM_NEWLINK: _IFINFOMSG, RTM_NEWADDR: _IFADDRMSG, RTM_NEWROUTE: _RTMSG,
            RTM_NEWRULE: _FIBRULEHDR, RTM_NEWNEIGH: _NDMSG, RTM_NEWNSID: _RTGENMSG}
_BUFSIZE = 1 << 16
_DUMP_RETRIES = 5
_DELETIONS = {RTM_DELLINK: _IFINFOMSG, RTM_DELADDR: _IFADDRMSG, RTM_DELROUTE: _RTMSG,
              RTM_DELRULE: _FIBRULEHDR, RTM_DELNEIGH: _NDMSG}


def header_of(kind: int) -> struct.Struct | None:
    """The fixed header of message type ``kind`` (replies, and the RTM_DEL* of announcements)."""
    return _HEADERS.get(kind) or _DELETIONS.get(kind)


class NetlinkError(OSError):
    """The kernel refused a request; ``code`` is the errno (``str`` adds the kernel's reason)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


def refused(obj, err: NetlinkError, action: str = "install") -> Exception:
    """The error for a request about ``obj`` (a kernel object: ``render()``) the kernel refused."""
    from cniplugin.protocol.errors import RouteConflict
    reason = f"; {err.reason}" if err.reason else ""
    return RouteConflict(f"the kernel refused to {action} `{obj.render()}`: "
                         f"{os.strerror(err.code)} (errno {err.code}{reason})")


class _Interrupted(Exception):
    """A dump raced with a change (NLM_F_DUMP_INTR): its content may be inconsistent."""


class Msg:
    """One decoded message: the fixed header's fields and the raw attributes (first of each)."""

    __slots__ = ("type", "fields", "attrs")

    def __init__(self, kind: int, fields: tuple, attrs: dict[int, bytes]) -> None:
        self.type, self.fields, self.attrs = kind, fields, attrs

    def u32(self, kind: int, default: int | None = None) -> int | None:
        value = self.attrs.get(kind)
        return _U32.unpack_from(value)[0] if value is not None else default

    def i32(self, kind: int, default: int | None = None) -> int | None:
        value = self.attrs.get(kind)
        return _I32.unpack_from(value)[0] if value is not None else default

    def u8(self, kind: int, default: int | None = None) -> int | None:
        value = self.attrs.get(kind)
        return value[0] if value else default

    def text(self, kind: int) -> str:
        value = self.attrs.get(kind)
        return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else ""

    def ip(self, kind: int) -> str:
        value = self.attrs.get(kind)
        return ip_text(value) if value else ""

    def mac(self, kind: int) -> str:
        value = self.attrs.get(kind)
        return ":".join(f"{b:02x}" for b in value) if value else ""

    def nested(self, kind: int) -> dict[int, bytes]:
        value = self.attrs.get(kind)
        return parse_attrs(value, 0, len(value)) if value else {}


# -- encoding / decoding helpers -------------------------------------------------------
def ip_text(raw: bytes) -> str:
    return socket.inet_ntop(AF_INET if len(raw) == 4 else AF_INET6, raw)


def ip_bytes(text: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in text else AF_INET, text)


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_i32(kind: int, value: int) -> bytes:
    return attr(kind, _I32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def parse_attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """Attributes in ``data[offset:end]``; the first of each type wins (nested flag masked)."""
    attrs: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind not in attrs:
            attrs[kind] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return attrs


def multipath(raw: bytes) -> list[tuple[int, int, dict[int, bytes]]]:
    """RTA_MULTIPATH legs as (ifindex, RTNH_F_* flags, attributes)."""
    legs, offset = [], 0
    while offset + _RTNEXTHOP.size <= len(raw):
        length, flags, _, ifindex = _RTNEXTHOP.unpack_from(raw, offset)
        if length < _RTNEXTHOP.size:
            break
        legs.append((ifindex, flags,
                     parse_attrs(raw, offset + _RTNEXTHOP.size, offset + length)))
        offset += (length + 3) & ~3
    return legs


class Socket:
    """One NETLINK_ROUTE socket, in the calling thread's netns at creation."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)  # kernel-side dump filters
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)         # the kernel's reason text
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)         # acks without our payload
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._seq = 0
        self._buf = bytearray(_BUFSIZE)

    def close(self) -> None:
        self.sock.close()

    # -- the three exchange shapes ------------------------------------------------------
    def dump(self, kind: int, body: bytes) -> list[Msg]:
        """Every message of a (filtered) dump; retried when the kernel reports it interrupted."""
        for _ in range(_DUMP_RETRIES):
            try:
                return self._exchange(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
            except _Interrupted:
                continue
        raise NetlinkError(errno.EINTR, "dump kept being interrupted by concurrent changes")

    def get(self, kind: int, body: bytes) -> Msg:
        """The single reply of a get request."""
        return self._exchange(kind, NLM_F_REQUEST, body)[0]

    def change(self, kind: int, flags: int, body: bytes) -> None:
        """A change request; returns when the kernel acknowledged it (raises if refused)."""
        self._exchange(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)

    def _exchange(self, kind: int, flags: int, body: bytes) -> list[Msg]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self.sock.send(_NLMSGHDR.pack(16 + len(body), kind, flags, seq, 0) + body)
        out: list[Msg] = []
        interrupted = False
        dumping = flags & NLM_F_DUMP == NLM_F_DUMP
        while True:
            size = self.sock.recv_into(self._buf, _BUFSIZE, socket.MSG_TRUNC)
            if size > _BUFSIZE:
                raise NetlinkError(errno.EMSGSIZE, "netlink reply larger than the buffer")
            data = bytes(self._buf[:size])
            offset = 0
            while offset + 16 <= size:
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < 16:
                    break
                start, offset = offset, offset + ((length + 3) & ~3)
                if mseq != seq:
                    continue
                interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_ERROR:
                    code = -_I32.unpack_from(data, start + 16)[0]
                    if code:
                        raise NetlinkError(code, _ext_ack(data, start, length, mflags))
                    return out
                if mtype == NLMSG_DONE:
                    if length >= 20 and (code := -_I32.unpack_from(data, start + 16)[0]) > 0:
                        raise NetlinkError(code, _ext_ack(data, start, length, mflags))
                    if interrupted:
                        raise _Interrupted()
                    return out
                header = _HEADERS.get(mtype)
                if header is None:
                    continue
                fields = header.unpack_from(data, start + 16)
                attrs = parse_attrs(data, start + 16 + ((header.size + 3) & ~3), start + length)
                out.append(Msg(mtype, fields, attrs))
                if not dumping and not flags & NLM_F_ACK:
                    return out


def _ext_ack(data: bytes, start: int, length: int, mflags: int) -> str:
    if not mflags & NLM_F_ACK_TLVS:
        return ""
    # error(4) + the original header (16; its payload is left out: NETLINK_CAP_ACK)
    attrs = parse_attrs(data, start + 16 + 4 + 16, start + length)
    raw = attrs.get(NLMSGERR_ATTR_MSG)
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


# -- request bodies --------------------------------------------------------------------
def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFOMSG.pack(family, 0, index, flags, change)


def ifaddrmsg(family: int = 0, prefixlen: int = 0, index: int = 0, scope: int = 0) -> bytes:
    return _IFADDRMSG.pack(family, prefixlen, 0, scope, index)


def rtmsg(family: int, dst_len: int = 0, src_len: int = 0, table: int = 0, proto: int = 0,
          scope: int = 0, rtype: int = 0, flags: int = 0) -> bytes:
    # table >= 256 only fits RTA_TABLE; the header then says RT_TABLE_UNSPEC (0)
    return _RTMSG.pack(family, dst_len, src_len, 0, table if table < 256 else 0, proto, scope,
                       rtype, flags)


def fib_rule_hdr(family: int, src_len: int = 0, table: int = 0, action: int = 0) -> bytes:
    return _FIBRULEHDR.pack(family, 0, src_len, 0, table if table < 256 else 0, 0, 0, action, 0)


def ndmsg(family: int = 0, ifindex: int = 0, state: int = 0) -> bytes:
    return _NDMSG.pack(family, ifindex, state, 0, 0)


def rtgenmsg(family: int = 0) -> bytes:
    return _RTGENMSG.pack(family)
