"""The kernel objects route-tune installs, as frozen values, and the planner's output.

Every object is a small frozen, ordered, hashable dataclass with:

* ``key()``   - the kernel's identity of the object (what a second object would collide with);
  two objects with equal keys but different fields are "the same object, changed".
* ``render()`` - the equivalent ``ip``/``sysctl`` command line (the CLI prints these; tests and
  docs compare against them).
* ``to_dict()`` / ``object_from_dict()`` - the JSON form stored in the per-attachment state file.

Families are the integers 4 and 6. Addresses are strings; prefixes are always "ip/len".

Rule, Route and Neighbour are also what the CLI reads back from the kernel: their ``LIVE``
fields (rule actions and selectors, route types and multipath legs, neighbour state) describe
anything a netns may hold. The planner never sets them, state files store them only when they
differ from their defaults, and the kernel's number -> name tables below are the only ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Union

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.records.values import value

LOCAL_TABLE, MAIN_TABLE, DEFAULT_TABLE = 255, 254, 253
#: unspec, default, main, local: never a hostRuleTable and never a pod table.
RESERVED_TABLES = frozenset({0, DEFAULT_TABLE, MAIN_TABLE, LOCAL_TABLE})
SCOPE_UNIVERSE = "universe"
SCOPE_LINK = "link"
#: The pod end of the underlay veth pair (its node end is ``rt`` + the container id).
UNDERLAY_VETH = "veth0"

#: Route protocols of routes route-tune finds, not makes: the kernel's own prefix routes, and
#: routes added without a protocol (``ip route add``, IPAM plugins).
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
#: The metrics the kernel gives IPv6 routes added without one (IPv4 routes get 0): a prefix
#: route of an address, and any other route. A plan states them so it compares equal to what
#: the kernel reports.
IPV6_CONNECTED_METRIC, IPV6_DEFAULT_METRIC = 256, 1024

# The kernel's numbers, named as iproute2 names them (rtnetlink.h, fib_rules.h).
TABLE_NAMES = {LOCAL_TABLE: "local", MAIN_TABLE: "main", DEFAULT_TABLE: "default"}
PROTO_NAMES = {0: "unspec", 1: "redirect", RTPROT_KERNEL: "kernel", RTPROT_BOOT: "boot",
               4: "static", 16: "dhcp", RTPROT_ROUTE_TUNE: "route-tune"}
SCOPE_NAMES = {0: SCOPE_UNIVERSE, 200: "site", 253: SCOPE_LINK, 254: "host", 255: "nowhere"}
SCOPE_NUMBERS = {v: k for k, v in SCOPE_NAMES.items()}
ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable",
                8: "prohibit"}


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))


def _live(default):
    """A field only read back from the kernel (the CLI's view); never set by the planner."""
    return field(default=default, metadata={"live": True})


def _ip_cmd(family: int) -> str:
    return "ip -6" if family == 6 else "ip"


def default_dst(family: int) -> str:
    return "::/0" if family == 6 else "0.0.0.0/0"


def connected_metric(family: int) -> int:
    """The metric of the kernel's prefix route for an address of ``family``."""
    return IPV6_CONNECTED_METRIC if family == 6 else 0


def default_metric(family: int) -> int:
    """The metric the kernel gives any other route of ``family`` added without one."""
    return IPV6_DEFAULT_METRIC if family == 6 else 0


def _table_word(table: int) -> str:
    return "main" if table == MAIN_TABLE else str(table)


@value(order=True)
class Rule:
    """``from <src> [fwmark <fwmark>/<fwmask>] lookup <table> pref <priority>``.

    src "" means ``from all``; fwmark 0 means no mark selector (the underlay reply rule is
    ``fwmark 0x1/0x1``, masked so that other tools' mark bits do not stop it matching).
    """

    family: int
    priority: int
    table: int
    src: str = ""
    proto: int = RTPROT_ROUTE_TUNE
    fwmark: int = 0
    fwmask: int = 0
    action: str = _live("lookup")    # lookup | goto | nop | blackhole | unreachable | prohibit
    goto: int = _live(0)
    dst: str = _live("")
    iif: str = _live("")
    oif: str = _live("")
    invert: bool = _live(False)
    unresolved: bool = _live(False)  # a goto whose target rule does not exist
    suppress_prefixlen: int | None = _live(None)
    other: tuple[str, ...] = _live(())   # selectors explain cannot feed (tos, ipproto, ports)
    selectors: bool = _live(False)   # selectors beyond src/fwmark: never "identical" to ours

    kind = "rule"

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    def key(self) -> tuple:
        key = ("rule", self.family, self.priority, self.src or "all", self.table)
        return key + (self.fwmark, self.fwmask) if self.fwmark else key

    def render(self) -> str:
        mark = f" fwmark {self.fwmark:#x}/{self.fwmask:#x}" if self.fwmark else ""
        return (f"{_ip_cmd(self.family)} rule add from {self.src or 'all'}{mark} "
                f"lookup {_table_word(self.table)} pref {self.priority} proto {self.proto}")


@value(order=True)
class Route:
    """A unicast route. ``metric`` is explicit (IPv6 routes default to 1024 in the kernel)."""

    family: int
    table: int
    dst: str
    dev: str
    gateway: str = ""
    scope: str = SCOPE_UNIVERSE
    src: str = ""
    metric: int = 0
    proto: int = RTPROT_ROUTE_TUNE
    type: str = _live("unicast")
    nexthops: tuple[tuple[str, str], ...] = _live(())   # multipath legs kept together: (dev, gw)
    dead: bool = _live(False)

    kind = "route"

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    @property
    def prefixlen(self) -> int:
        return int(self.dst.rpartition("/")[2])

    def key(self) -> tuple:
        # The kernel identifies a route by table, prefix and metric; device and gateway are
        # content. (IPv6 multipath legs are split into separate Routes by the adapter.)
        return ("route", self.family, self.table, self.dst, self.metric)

    @property
    def is_default(self) -> bool:
        return self.dst == default_dst(self.family)

    def render(self) -> str:
        dst = "default" if self.is_default else self.dst.removesuffix(
            "/128" if self.family == 6 else "/32")
        words = [f"{_ip_cmd(self.family)} route replace {dst}"]
        if self.gateway:
            words.append(f"via {self.gateway}")
        words.append(f"dev {self.dev}")
        if self.scope != SCOPE_UNIVERSE:
            words.append(f"scope {self.scope}")
        if self.src:
            words.append(f"src {self.src}")
        if self.metric:
            words.append(f"metric {self.metric}")
        words.append(f"table {_table_word(self.table)} proto {self.proto}")
        return " ".join(words)

    def with_(self, **changes) -> Route:
        return dataclasses.replace(self, **changes)


@value(order=True)
class Neighbour:
    """A PERMANENT neighbour entry ``<ip> lladdr <lladdr> dev <dev>``."""

    family: int
    dev: str
    ip: str
    lladdr: str
    permanent: bool = _live(True)
    proto: int = _live(RTPROT_ROUTE_TUNE)

    kind = "neigh"

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    def key(self) -> tuple:
        return ("neigh", self.dev, self.ip)

    def render(self) -> str:
        return (f"{_ip_cmd(self.family)} neigh replace {self.ip} lladdr {self.lladdr} "
                f"dev {self.dev} nud permanent proto {RTPROT_ROUTE_TUNE}")


@value(order=True)
class Sysctl:
    """A /proc/sys value, by its slash path (``net/ipv4/conf/net1/rp_filter``).

    Slash form because interface names may contain dots, which the dotted form cannot express.
    """

    path: str
    value: str

    kind = "sysctl"

    def key(self) -> tuple:
        return ("sysctl", self.path)

    def render(self) -> str:
        return f"sysctl -w {self.path}={self.value}"


@value(order=True)
class LinkAttr:
    """A link attribute: ``attr`` is ``txqlen`` or ``address``."""

    ifname: str
    attr: str
    value: str

    kind = "link"

    def key(self) -> tuple:
        return ("link", self.ifname, self.attr)

    def render(self) -> str:
        word = "txqueuelen" if self.attr == "txqlen" else self.attr
        return f"ip link set dev {self.ifname} {word} {self.value}"


@value(order=True)
class Veth:
    """The underlay veth pair: ``name`` (veth0) in the pod, ``peer`` on the node.

    Both MACs are explicit (udev's MACAddressPolicy leaves a set address alone, so the PERMANENT
    neighbours that name them cannot go stale). ``address`` is vethLinkAddress ("ip/32", "" =
    none). ``alias`` is written to the node end's ifalias: it names the owning container, so a
    DEL that cannot reach the pod deletes only its own node end. ``configured`` is always True
    in a plan; a read says False when an end is down, the MTUs differ or the node end's
    ``accept_ra`` is not 0.
    """

    name: str
    peer: str
    mtu: int
    mac: str
    peer_mac: str
    address: str = ""
    alias: str = ""
    configured: bool = True

    kind = "veth"

    def key(self) -> tuple:
        return ("veth", self.name)

    def render(self) -> str:
        lines = [f"ip link add {self.name} mtu {self.mtu} address {self.mac} type veth peer name "
                 f"{self.peer} mtu {self.mtu} address {self.peer_mac} netns <node>",
                 f"sysctl -w net/ipv6/conf/{self.peer}/accept_ra=0  # node",
                 f"ip link set {self.peer} alias {self.alias} up  # node"]
        if self.address:
            lines.append(f"ip addr replace {self.address} dev {self.name}")
        lines.append(f"ip link set {self.name} up")
        return "; ".join(lines)


@value(order=True)
class NftTable:
    """route-tune's nftables table (``inet route_tune``, see ``kernel.nft``): reply steering."""

    ifname: str = UNDERLAY_VETH
    mark: int = 0x1
    mask: int = 0x1
    #: Read back only: what the live table is when its rules are not the ones route-tune writes.
    foreign: str = _live("")

    kind = "nft"

    def key(self) -> tuple:
        return ("nft", "inet", "route_tune")

    def render(self) -> str:
        if self.foreign:
            return self.foreign
        return (f"nft -f -  # table inet route_tune: connections in via {self.ifname} get ct "
                f"mark {self.mark:#x}/{self.mask:#x}, their replies the same meta mark")


KernelObject = Union[Rule, Route, Neighbour, Sysctl, LinkAttr, Veth, NftTable]
_KINDS = {cls.kind: cls for cls in (Rule, Route, Neighbour, Sysctl, LinkAttr, Veth, NftTable)}


_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls) if not f.metadata)
           for cls in _KINDS.values()}
_LIVE_FIELDS = {cls: tuple((f.name, f.default) for f in dataclasses.fields(cls) if f.metadata)
                for cls in _KINDS.values()}


def to_dict(obj: KernelObject) -> dict:
    # Every field is a plain str/int/bool: no need for dataclasses.asdict's deep copy. Live
    # fields only when set, so planned objects keep the state-file form they always had.
    out = {"kind": obj.kind, **{name: getattr(obj, name) for name in _FIELDS[type(obj)]}}
    for name, default in _LIVE_FIELDS[type(obj)]:
        value = getattr(obj, name)
        if value != default:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def object_from_dict(data: dict) -> KernelObject:
    fields = dict(data)
    cls = _KINDS[fields.pop("kind")]
    if "nexthops" in fields:
        fields["nexthops"] = tuple(tuple(leg) for leg in fields["nexthops"])
    if "other" in fields:
        fields["other"] = tuple(fields["other"])
    return cls(**fields)


def _rank(obj: KernelObject) -> int:
    # Dependency order: link attributes, the veth pair (its sysctls, neighbours and routes need
    # it), sysctls and the nft table, neighbours, link-scope routes, routes via a gateway (their
    # next hop must resolve), and rules last (a rule must never point at a table that is still
    # being filled). Removal is the reverse.
    if isinstance(obj, LinkAttr):
        return 0
    if isinstance(obj, Veth):
        return 1
    if isinstance(obj, (Sysctl, NftTable)):
        return 2
    if isinstance(obj, Neighbour):
        return 3
    if isinstance(obj, Route):
        return 5 if obj.gateway else 4
    return 6


def apply_order(objs) -> list[KernelObject]:
    """Objects sorted for installation; reverse it for removal."""
    return sorted(objs, key=lambda o: (_rank(o), o.key()))


@value
class Desired:
    """What one attachment needs, split by side and by ownership.

    * ``pod_owned`` / ``node_owned``: belong to this attachment alone.
    * ``pod_shared``: used by every attachment of the pod (table 100, its rule, main-table
      cluster routes, neighbours, ``all`` sysctls); removed by the last attachment's DEL.
    * ``node_shared``: the node rule(s) into hostRuleTable; removed with the node's last
      attachment.
    * underlay: the veth pair, the nft table, table 100 and the main-table cluster routes belong
      to the first invocation's (eth0's) ``pod_owned``: later NICs never list them.
    * ``displaced``: foreign pod main-table routes that ADD removes and DEL restores.
    """

    ifname: str
    table: int
    families: tuple[int, ...]
    host_peer: str = ""
    mode: str = "overlay"          # overlay | underlay (what auto resolved to)
    pod_owned: tuple[KernelObject, ...] = ()
    pod_shared: tuple[KernelObject, ...] = ()
    node_owned: tuple[KernelObject, ...] = ()
    node_shared: tuple[KernelObject, ...] = ()
    displaced: tuple[Route, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def pod_objects(self) -> list[KernelObject]:
        return [*self.pod_owned, *self.pod_shared]

    def node_objects(self) -> list[KernelObject]:
        return [*self.node_owned, *self.node_shared]

    @property
    def host_rule_table(self) -> int | None:
        """The node table this plan routes the pod's addresses in (None: no node side)."""
        return next((o.table for o in self.node_shared), None)

    def render_lines(self) -> list[str]:
        """The whole plan as commands, grouped by side, in installation order."""
        lines = [f"# pod ({self.mode}): {self.ifname} uses table {self.table}"]
        lines += [f"{_ip_cmd(r.family)} route del {_displaced_words(r)}  # displaced, restored on DEL"
                  for r in self.displaced]
        lines += [o.render() for o in apply_order(self.pod_objects())]
        if self.node_objects():
            lines.append(f"# node: via host peer {self.host_peer}")
            lines += [o.render() for o in apply_order(self.node_objects())]
        return lines

    def to_dict(self) -> dict:
        def dump(objs):
            return [to_dict(o) for o in objs]
        return {
            "ifname": self.ifname, "table": self.table, "families": list(self.families),
            "host_peer": self.host_peer, "mode": self.mode,
            "pod_owned": dump(self.pod_owned), "pod_shared": dump(self.pod_shared),
            "node_owned": dump(self.node_owned), "node_shared": dump(self.node_shared),
            "displaced": dump(self.displaced), "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Desired:
        def load(name):
            return tuple(object_from_dict(d) for d in data.get(name, ()))
        return cls(
            ifname=data["ifname"], table=data["table"], families=tuple(data["families"]),
            host_peer=data.get("host_peer", ""), mode=data.get("mode", "overlay"),
            pod_owned=load("pod_owned"), pod_shared=load("pod_shared"),
            node_owned=load("node_owned"), node_shared=load("node_shared"),
            displaced=load("displaced"), warnings=tuple(data.get("warnings", ())),
        )


def _displaced_words(route: Route) -> str:
    words = [route.dst, f"dev {route.dev}"]
    if route.gateway:
        words.insert(1, f"via {route.gateway}")
    words.append(f"table {_table_word(route.table)}")
    return " ".join(words)
