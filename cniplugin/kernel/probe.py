"""Raw-socket ARP/NDP probing of a pod interface: IP conflict detection, gateway reachability,
gratuitous ARP / unsolicited NA announcements, and the coordinator's MAC-from-prefix rule.

The caller's *thread* must already be inside the pod netns: sockets, ``/proc/thread-self/net`` and
``/proc/sys/net`` then all refer to the pod. The sockets and the send-and-listen loop are
``kernel.rawsock``'s; what to send, what counts as an answer and when to wait for DAD are here.
The timing rules are in ``docs/probing.md``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence

from cniplugin.kernel import packets as pk
from cniplugin.kernel.rawsock import Channel, Channels, IPAddress, close_later, exchange, open_packet
from cniplugin.protocol.errors import CNIError, GatewayUnreachable, IPConflict, TryAgainLater
from cniplugin.records.values import value

__all__ = ["ProbeOptions", "check_conflicts", "check_gateways", "announce", "mac_from_prefix",
           "probe_interface", "wait_dad"]

log = logging.getLogger(__name__)

_IFA_F_OPTIMISTIC, _IFA_F_DADFAILED, _IFA_F_TENTATIVE = 0x04, 0x08, 0x40
_DAD_POLL = 0.005


@value
class ProbeOptions:
    """``detectOptions``: ``retries`` probes, ``interval`` apart (capped at ``timeout``), and
    ``timeout`` to wait after the last one. All in seconds."""

    retries: int = 3
    interval: float = 0.010
    timeout: float = 0.100

    def __post_init__(self) -> None:
        if self.retries < 1 or self.interval < 0 or self.timeout <= 0:
            raise ValueError(f"invalid probe options {self}")

    @property
    def bound(self) -> float:
        """The longest a check waits: last probe at (retries-1) x spacing, then timeout."""
        return (self.retries - 1) * min(self.interval, self.timeout) + self.timeout


# --- MAC prefix ----------------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"^([0-9a-fA-F]{2}):([0-9a-fA-F]{2})$")


def mac_from_prefix(prefix: str, ip: str) -> str:
    """Coordinator's rule: the 2-byte ``prefix`` + the address's last 4 bytes (all of an IPv4).

    ``0a:1b`` + ``172.16.11.10`` -> ``0a:1b:ac:10:0b:0a``. ``ip`` may carry a ``/prefix``. Expects a
    prefix the config layer validated as unicast; raises ValueError for anything else.
    """
    m = _PREFIX_RE.match(prefix)
    if not m:
        raise ValueError(f"podMACPrefix {prefix!r} is not of the form xx:xx (two hex bytes)")
    head = bytes(int(x, 16) for x in m.groups())
    if head[0] & 0x01:
        raise ValueError(f"podMACPrefix {prefix!r} is multicast (low bit of the first byte set)")
    return pk.mac_to_str(head + _address(ip).packed[-4:])


# --- classification of received frames -------------------------------------------------------

def _arp_classifier(mac: bytes, want_op: int | None) -> Callable[[bytes], tuple | None]:
    """ARP frames from another MAC -> (sender IP, sender MAC); ``want_op`` None = any operation."""
    def classify(frame: bytes):
        p = pk.parse_arp(frame)
        if p and p.sender_mac != mac and (want_op is None or p.op == want_op):
            return p.sender_ip, p.sender_mac
        return None
    return classify


def _na_classifier(mac: bytes) -> Callable[[bytes], tuple | None]:
    """NAs from another MAC -> (target, holder MAC: the target LL option, else Ethernet source)."""
    def classify(frame: bytes):
        p = pk.parse_nd(frame)
        if p and p.type == pk.ND_NA:
            holder = p.lladdr or p.eth_src
            if holder != mac and p.eth_src != mac:
                return p.target, holder
        return None
    return classify


# --- IPv6 DAD ---------------------------------------------------------------------------------

def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _ipv6_flags(ifname: str, ip: ipaddress.IPv6Address) -> int | None:
    """IFA flags of ``ip`` on ``ifname`` in the *thread's* netns (``/proc/self`` would be the
    process's)."""
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            for line in f:
                cols = line.split()
                if len(cols) == 6 and cols[5] == ifname and cols[0] == ip.exploded.replace(":", ""):
                    return int(cols[4], 16)
    except OSError:
        return None
    return None


def _dad_bound(ifname: str) -> float:
    """How long the kernel's DAD can take: initial random delay + transmits x RetransTimer, +1 s."""
    base = "/proc/sys/net/ipv6"
    transmits = _read_int(f"{base}/conf/{ifname}/dad_transmits", 1)
    retrans_ms = _read_int(f"{base}/neigh/{ifname}/retrans_time_ms", 1000)
    delay_s = _read_int(f"{base}/conf/{ifname}/router_solicitation_delay", 1)
    return transmits * retrans_ms / 1000 + delay_s + 1.0


def wait_dad(ifname: str, ip: str | ipaddress.IPv6Address) -> float:
    """Wait (bounded, see ``_dad_bound``) until ``ip`` is no longer tentative on ``ifname``.

    An address not configured there is not being verified by the kernel: returns at once. Raises
    IPConflict if the kernel's DAD failed, TryAgainLater if it is still tentative at the bound.
    Returns the seconds waited.
    """
    ip = ipaddress.IPv6Address(ip)
    start = time.monotonic()
    deadline = None
    while True:
        flags = _ipv6_flags(ifname, ip)
        if flags is None:
            return 0.0
        if flags & _IFA_F_DADFAILED:
            raise IPConflict(f"IP conflict: the kernel's duplicate address detection failed "
                             f"for {ip} on {ifname}: another node (MAC unknown) holds it")
        # optimistic addresses (RFC 4429) may already be used as a source
        if not flags & _IFA_F_TENTATIVE or flags & _IFA_F_OPTIMISTIC:
            return time.monotonic() - start
        if deadline is None:
            deadline = start + _dad_bound(ifname)
        if time.monotonic() >= deadline:
            raise TryAgainLater(f"{ip} on {ifname} is still tentative (IPv6 duplicate address "
                                f"detection) after {(time.monotonic() - start) * 1000:.0f} ms; "
                                f"check that {ifname} is up")
        time.sleep(_DAD_POLL)


# --- the checks -------------------------------------------------------------------------------

def _exchange(channels: list[Channel], opts: ProbeOptions,
              on_match: Callable[[Channel, IPAddress, bytes], None]) -> float:
    return exchange(channels, on_match, retries=opts.retries, interval=opts.interval,
                    timeout=opts.timeout)


def _address(a: str | IPAddress) -> IPAddress:
    return ipaddress.ip_interface(a).ip


def _unique(items):
    return list(dict.fromkeys(items))


def check_conflicts(ifname: str, addrs: Sequence[str], opts: ProbeOptions) -> None:
    """Raise IPConflict if another MAC on ``ifname``'s segment holds one of ``addrs``.

    IPv4: RFC 5227 ARP probes (sender IP 0.0.0.0, so no peer learns anything from them); any ARP
    whose sender is the address, from another MAC, is a conflict. IPv6: NS from ``::`` to the
    solicited-node group (a DAD probe); an NA for the address from another MAC is a conflict. Both
    families are probed together, over one socket each.
    """
    ips = _unique(_address(a) for a in addrs)
    v4 = [ip for ip in ips if ip.version == 4]
    v6 = [ip for ip in ips if ip.version == 6]
    if not ips:
        return
    with Channels(ifname) as chans:
        if v4:
            ch = chans.open(pk.ETH_P_ARP, pk.arp_sender_filter(v4))
            ch.classify = _arp_classifier(ch.mac, None)
            ch.pending = {ip: pk.build_arp(pk.ARP_REQUEST, ch.mac, "0.0.0.0", ip) for ip in v4}
        if v6:
            ch = chans.open(pk.ETH_P_IPV6, pk.na_target_filter(v6))
            ch.classify = _na_classifier(ch.mac)
            ch.pending = {ip: pk.build_ns(ch.mac, "::", ip) for ip in v6}

        def conflict(ch: Channel, ip: IPAddress, holder: bytes) -> None:
            how = "answered an ARP probe for it" if ip.version == 4 else "advertised it (NA)"
            raise IPConflict(
                f"IP conflict: address {ip} of {ifname} is already in use by MAC "
                f"{pk.mac_to_str(holder)}, which {how}; free or change the address",
                details=f"interface={ifname} address={ip} mac={pk.mac_to_str(holder)}")

        elapsed = _exchange(chans.items, opts, conflict)
        failed = [ch for ch in chans.items if not ch.tries and ch.error]
        if failed:
            raise TryAgainLater(f"could not probe {ifname} for address conflicts: "
                                f"sending failed: {failed[0].error}")
    log.debug("no address conflict on %s for %s (%.1f ms)", ifname,
              ", ".join(map(str, ips)), elapsed * 1000)


def check_gateways(ifname: str, pairs: Sequence[tuple[str, str]], opts: ProbeOptions) -> None:
    """Raise GatewayUnreachable unless every gateway of ``pairs`` = (source IP, gateway IP) answers.

    IPv4: ARP request from the source; any ARP reply from the gateway IP confirms it. IPv6: NS from
    the source (waited out of DAD first) with our source LL option; an NA for the gateway confirms
    it. Each check returns as soon as its last gateway answered.
    """
    sources: dict[IPAddress, IPAddress] = {}
    for src, gw in pairs:
        src_ip, gw_ip = _address(src), _address(gw)
        if src_ip.version != gw_ip.version:
            raise ValueError(f"gateway {gw_ip} and source {src_ip} are of different families")
        sources.setdefault(gw_ip, src_ip)
    if not sources:
        return
    for src in _unique(s for s in sources.values() if s.version == 6):
        wait_dad(ifname, src)
    v4 = [gw for gw in sources if gw.version == 4]
    v6 = [gw for gw in sources if gw.version == 6]
    with Channels(ifname) as chans:
        if v4:
            ch = chans.open(pk.ETH_P_ARP, pk.arp_sender_filter(v4))
            ch.classify = _arp_classifier(ch.mac, pk.ARP_REPLY)
            ch.pending = {gw: pk.build_arp(pk.ARP_REQUEST, ch.mac, sources[gw], gw) for gw in v4}
        if v6:
            ch = chans.open(pk.ETH_P_IPV6, pk.na_target_filter(v6))
            ch.classify = _na_classifier(ch.mac)
            ch.pending = {gw: pk.build_ns(ch.mac, sources[gw], gw) for gw in v6}
        elapsed = _exchange(chans.items, opts, lambda ch, gw, _mac: ch.pending.pop(gw))
        for ch in chans.items:
            for gw in ch.pending:
                raise _unreachable(ifname, gw, sources[gw], ch, elapsed)
    log.debug("gateways %s answered on %s in %.2f ms", ", ".join(map(str, sources)), ifname,
              elapsed * 1000)


def _unreachable(ifname: str, gw: IPAddress, src: IPAddress, ch: Channel,
                 elapsed: float) -> GatewayUnreachable:
    proto = "ARP request" if gw.version == 4 else "neighbor solicitation"
    tries = ch.tries.get(gw, 0)
    waited = f"{elapsed * 1000:.0f} ms"
    sent = f"no answer to {tries} {proto}(s) from {src} within {waited}"
    if ch.error:
        sent += f" (sending failed: {ch.error})"
    return GatewayUnreachable(
        f"gateway {gw} is unreachable from {ifname}: {sent}; check that {gw} is the gateway of "
        f"this address's pool, that it is up and on the same L2 segment/VLAN as {ifname}, and that "
        f"nothing on the way drops {'ARP' if gw.version == 4 else 'NDP'}",
        details=f"interface={ifname} gateway={gw} source={src} tries={tries} waited={waited}")


def announce(ifname: str, addrs: Sequence[str]) -> None:
    """Tell the segment that ``addrs`` now live at ``ifname``'s MAC, so stale caches are replaced.

    IPv4: one gratuitous ARP request (sender = target = the address) to broadcast. IPv6: one
    unsolicited NA (override flag, target LL option) to ff02::1, once the address left DAD: a
    tentative one is waited for (``wait_dad``'s bound) and skipped, with a log line, if it is
    still tentative then or DAD failed. Never raises: failures are logged, an announcement is
    best effort.
    """
    try:
        ips = _unique(_address(a) for a in addrs)
    except ValueError as exc:
        log.warning("not announcing on %s: %s", ifname, exc)
        return
    for version, ethertype in ((4, pk.ETH_P_ARP), (6, pk.ETH_P_IPV6)):
        family = [ip for ip in ips if ip.version == version]
        if family:
            try:
                _announce_family(ifname, ethertype, family)
            except (CNIError, OSError, ValueError) as exc:
                log.warning("announcing %s on %s failed: %s", family, ifname, exc)


def _announce_family(ifname: str, ethertype: int, ips: list[IPAddress]) -> None:
    sock, mac = open_packet(ifname, ethertype, [(0x06, 0, 0, 0)])  # send-only: a drop-all filter
    sent: list[IPAddress] = []
    try:
        for ip in ips:
            if ip.version == 4:
                frame = pk.build_arp(pk.ARP_REQUEST, mac, ip, ip)
            else:
                try:  # RFC 4862 §5.4: a tentative address must not be advertised
                    wait_dad(ifname, ip)
                except (IPConflict, TryAgainLater) as exc:
                    log.warning("no unsolicited NA for %s on %s: %s", ip, ifname, exc.msg)
                    continue
                frame = pk.build_na(mac, ip, ip)
            sock.send(frame)
            sent.append(ip)
        log.debug("announced %s on %s as %s", ", ".join(map(str, sent)), ifname,
                  pk.mac_to_str(mac))
    finally:
        close_later(sock)


def probe_interface(ifname: str, addrs: Sequence[str],
                    gateways: Sequence[str | tuple[str, str]], opts: ProbeOptions, *,
                    conflict: bool, gateway: bool) -> None:
    """The CLI's ``probe``: conflict detection first, then gateway detection, never both at once
    (a gateway probe from an address someone else holds poisons the gateway's cache).

    A bare gateway is probed from the first address of ``addrs`` of its family.
    """
    pairs = []
    for gw in gateways:
        if isinstance(gw, str):
            gw_ip = _address(gw)
            src = next((a for a in map(_address, addrs) if a.version == gw_ip.version), None)
            if src is None:
                raise ValueError(f"no IPv{gw_ip.version} address to probe gateway {gw_ip} from")
            gw = (str(src), str(gw_ip))
        pairs.append(gw)
    if conflict:
        check_conflicts(ifname, addrs, opts)
    if gateway:
        check_gateways(ifname, pairs, opts)
