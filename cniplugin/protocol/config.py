"""``PluginConfig``: every route-tune option, its defaults, precedence and validation.

Precedence: built-in defaults < node defaults file < conflist (one level deep for the
``logOptions``/``detectOptions`` objects). The node defaults file (``protocol.env.read_node_defaults``)
may also hold node-only keys that a conflist cannot set, because a NetworkAttachmentDefinition is
written by a namespace tenant: ``logDir``, ``stateDir``, ``hostRulePriority``, ``socketPath``,
``allowedHostRuleTables``.

Keys are coordinator's camelCase names (aliases); attributes are snake_case. Unknown keys are
ignored; one within edit distance 2 of ours (case-insensitive) gets a warning naming the intended
key. Every validation failure is ``InvalidConfig`` (code 7) in the form
"key `x`: value `y` is not valid; expected ...".
"""

# No ``from __future__ import annotations``: pydantic would have to compile and eval every field's
# annotation string at class creation, on every plugin process.
import ipaddress
import json
import logging
import re
from typing import Annotated, Any, Literal, Mapping, Union

from cniplugin.protocol.pydantic_base import Before, Dump, Field, Model, NestedModel, \
    ValidationError, ValidationInfo, field_validator, model_validator

from cniplugin.records.defaults import HOST_RULE_PRIORITY, HOST_RULE_TABLE, SOCKET_PATH, STATE_DIR, \
    normalise_mode
from cniplugin.records.objects import RESERVED_TABLES
from cniplugin.protocol.env import NodeDefaults, read_node_defaults, validate_ifname
from cniplugin.protocol.errors import InvalidConfig, InvalidEnvironment
from cniplugin.protocol.log import DEFAULT_LOG_DIR, LogOptions, effective_log_options

__all__ = ["PluginConfig", "PolicyRoute", "DetectOptions", "load", "build", "NODE_ONLY_KEYS",
           "parse_go_duration"]

log = logging.getLogger(__name__)

#: Keys the runtime (or Multus) sets; accepted and not ours to interpret.
RUNTIME_KEYS = frozenset({"cniVersion", "cniVersions", "name", "type", "prevResult",
                          "runtimeConfig", "args", "capabilities", "ipam", "dns"})
#: Keys only the node defaults file may set.
NODE_ONLY_KEYS = ("logDir", "stateDir", "hostRulePriority", "socketPath", "allowedHostRuleTables")
_NESTED = ("logOptions", "detectOptions")
_U32_MAX = 2**32 - 1

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _to_network(value: Any) -> IPNetwork:
    """CIDR or bare IP (normalised to /32 or /128); host bits are masked as Go's ParseCIDR does."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if not isinstance(value, str) or "%" in value:
        raise ValueError("expected a CIDR such as 10.0.0.0/16 or a bare IP")
    try:
        if "/" not in value:
            return ipaddress.ip_network(ipaddress.ip_address(value))
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected a CIDR such as 10.0.0.0/16 or a bare IP") from None


def _to_cluster_network(value: Any) -> IPNetwork:
    network = _to_network(value)
    if network.prefixlen == 0:
        raise ValueError("expected a CIDR narrower than /0 (a /0 would capture all traffic)")
    return network


def _to_address(value: Any) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        if not isinstance(value, str) or "%" in value:
            raise ValueError
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("expected an IP address") from None


_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}


def parse_go_duration(text: Any) -> float:
    """A Go ``time.ParseDuration`` string (``100ms``, ``1.5s``, ``1m30s``, ``500us``, ``0``) in
    seconds; negative durations are refused (a wait cannot be negative)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text == 0:
        return 0.0
    if not isinstance(text, str) or not text:
        raise ValueError("expected a Go duration string such as 100ms, 1s or 1m30s")
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if not match:
            raise ValueError("expected a Go duration string such as 100ms, 1s or 1m30s")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total


def _to_ifname(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an interface name")
    try:
        validate_ifname(value)
    except InvalidEnvironment as exc:
        raise ValueError(f"expected a valid interface name ({exc.msg})") from None
    return value


def _to_mac_prefix(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{2}[:-][0-9a-fA-F]{2}", value):
        raise ValueError("expected two hex bytes such as 0a:1b")
    if int(value[:2], 16) & 1:
        raise ValueError("expected a unicast prefix (the first byte's lowest bit must be 0)")
    return value.replace("-", ":").lower()


def _to_veth_address(value: Any) -> ipaddress.IPv4Address | None:
    if value in ("", None):
        return None
    address = _to_address(value)
    if address.version != 4:
        raise ValueError("expected an IPv4 address")
    return address


def _to_table(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer routing table id")
    if not 1 <= value <= _U32_MAX or value in RESERVED_TABLES:
        raise ValueError(f"expected a table id in 1..{_U32_MAX} other than "
                         f"{', '.join(map(str, sorted(RESERVED_TABLES - {0})))}")
    return value


def _to_abs_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected an absolute path")
    return value


def _dump_log_options(value: Any) -> Any:
    return value._asdict() if isinstance(value, LogOptions) else value


Network = Annotated[IPNetwork, Before(_to_network)]
ClusterNetwork = Annotated[IPNetwork, Before(_to_cluster_network)]
Address = Annotated[IPAddress, Before(_to_address)]
Duration = Annotated[float, Before(parse_go_duration)]
IfName = Annotated[str, Before(_to_ifname)]
Table = Annotated[int, Before(_to_table)]
AbsPath = Annotated[str, Before(_to_abs_path)]


class PolicyRoute(NestedModel):
    """A static route put into the attachment's policy table: ``dst via gw dev netK``."""

    dst: Network
    gw: Address

    @model_validator(mode="after")
    def _same_family(self) -> "PolicyRoute":
        if self.dst.version != self.gw.version:
            raise ValueError("expected gw of the same IP family as dst")
        return self


class DetectOptions(NestedModel):
    retries: int = Field(3, ge=1)
    interval: Duration = Field(0.010, ge=0)  # seconds
    timeout: Duration = Field(0.100, gt=0)  # seconds


class PluginConfig(Model):
    """The validated route-tune configuration (every key, its type and default: docs/configuration.md)."""

    mode: Annotated[Literal["auto", "overlay", "underlay", "disabled"],
                    Before(normalise_mode)] = "auto"
    pod_default_cni_nic: IfName = Field("eth0", alias="podDefaultCniNic")
    tune_pod_routes: bool = Field(True, alias="tunePodRoutes")
    pod_default_route_nic: Annotated[str, Before(
        lambda v: v if v == "" else _to_ifname(v))] = Field("", alias="podDefaultRouteNic")
    # Node-only keys come first so the table check below can see the allowed list.
    log_dir: AbsPath = Field(DEFAULT_LOG_DIR, alias="logDir")
    state_dir: AbsPath = Field(STATE_DIR, alias="stateDir")
    socket_path: AbsPath = Field(SOCKET_PATH, alias="socketPath")
    allowed_host_rule_tables: list[Table] | None = Field(None, alias="allowedHostRuleTables")
    host_rule_priority: int = Field(HOST_RULE_PRIORITY, ge=1, le=32765, alias="hostRulePriority")
    host_rule_table: Table = Field(HOST_RULE_TABLE, alias="hostRuleTable")
    pod_rp_filter: int = Field(0, ge=-1, le=2, alias="podRPFilter")
    # A bool, not a sysctl map: a tenant's NetworkAttachmentDefinition can switch the fixed
    # arp_ignore/arp_announce pair on netK off, never name another sysctl or value.
    pod_arp_isolation: bool = Field(True, alias="podARPIsolation")
    host_rp_filter: Any = Field(None, alias="hostRPFilter")
    overlay_pod_cidr: list[ClusterNetwork] = Field([], alias="overlayPodCIDR")
    service_cidr: list[ClusterNetwork] = Field([], alias="serviceCIDR")
    hijack_cidr: list[ClusterNetwork] = Field([], alias="hijackCIDR")
    policy_routes: list[PolicyRoute] = Field([], alias="policyRoutes")
    tx_queue_len: int = Field(0, ge=0, le=_U32_MAX, alias="txQueueLen")
    detect_gateway: bool = Field(False, alias="detectGateway")
    detect_ip_conflict: bool = Field(False, alias="detectIPConflict")
    detect_options: DetectOptions = Field(default_factory=DetectOptions, alias="detectOptions")
    pod_mac_prefix: Annotated[str, Before(_to_mac_prefix)] = Field(
        "", alias="podMACPrefix")
    veth_link_address: Annotated[ipaddress.IPv4Address | None,
                                 Before(_to_veth_address)] = Field(
        None, alias="vethLinkAddress")
    veth_mtu: int = Field(1500, gt=0, le=65535, alias="vethMTU")
    # Becomes LogOptions below; dumped as a dict, as it was when LogOptions was a dataclass.
    log_options: Annotated[Any, Dump(_dump_log_options)] = Field(None, alias="logOptions")
    multus_nic_prefix: Any = Field(None, alias="multusNicPrefix")  # accepted, unused

    @field_validator("host_rule_table")
    @classmethod
    def _table_allowed(cls, table: int, info: ValidationInfo) -> int:
        allowed = info.data.get("allowed_host_rule_tables")
        if allowed is not None and table not in allowed:
            raise ValueError(f"expected one of the node's allowedHostRuleTables {allowed}")
        return table

    @model_validator(mode="after")
    def _resolve_log_options(self, info: ValidationInfo) -> "PluginConfig":
        # The request's logOptions over the node's: build() passes the node defaults as context.
        node = {**((info.context or {}).get("node_defaults") or {}), "logDir": self.log_dir}
        try:
            self.log_options = effective_log_options(node, self.log_options)
        except InvalidConfig as exc:
            raise ValueError(f"@{exc.msg}") from None  # already phrased; see _translate
        return self

    @property
    def disabled(self) -> bool:
        return self.mode == "disabled"


OUR_KEYS = tuple(f.alias or name for name, f in PluginConfig.model_fields.items())
_NESTED_KEYS = {"logOptions": ("logLevel", "logFile", "logMaxSize", "logMaxAge", "logMaxCount"),
                "detectOptions": ("retries", "interval", "timeout")}


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _likely_key(key: str, candidates: tuple[str, ...]) -> str | None:
    best = min(candidates, key=lambda c: _edit_distance(key.lower(), c.lower()))
    return best if _edit_distance(key.lower(), best.lower()) <= 2 else None


def _warn_unknown(source: Mapping, candidates: tuple[str, ...], where: str, prefix: str = "") -> None:
    for key in source:
        if key in candidates or key in RUNTIME_KEYS or key.startswith("cni.dev/"):
            continue
        intended = _likely_key(key, candidates)
        if intended:
            log.warning("%s: unknown key `%s%s` ignored; did you mean `%s%s`?",
                        where, prefix, key, prefix, intended)


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except ValueError:
        return str(value)


def _translate(exc: ValidationError, raw: Mapping, defaults: NodeDefaults) -> InvalidConfig:
    """Turn pydantic's errors into "key `x`: value `y` is not valid; expected ..." lines; a hint
    an earlier line gave is not repeated (libcni prints ``msg; details`` as one line)."""
    problems, hints = [], set()
    for error in exc.errors():
        msg = error["msg"].removeprefix("Value error, ")
        if msg.startswith("@"):  # a message already phrased by protocol.log
            problems.append(msg[1:])
            continue
        loc = error["loc"]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = msg.removeprefix("Input should be ")
        if not msg.startswith("expected"):
            msg = "expected " + msg
        line = f"key `{key}`: value `{_format_value(error.get('input'))}` is not valid"
        if msg not in hints:
            line += f"; {msg}"
            hints.add(msg)
        if loc and loc[0] not in raw and loc[0] in defaults.values:
            line += f" (from the node defaults file {defaults.path})"
        problems.append(line)
    return InvalidConfig(problems[0], "; ".join(problems[1:]))


def _merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key in _NESTED and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def build(raw_config: Mapping, defaults: NodeDefaults) -> PluginConfig:
    """Validate ``raw_config`` (the stdin object) on top of already-read node defaults."""
    for key in NODE_ONLY_KEYS:
        if key in raw_config:
            raise InvalidConfig(
                f"key `{key}` cannot be set in a network config; "
                f"set it in the node defaults file ({defaults.path})")
    _warn_unknown(raw_config, OUR_KEYS, "network config")
    _warn_unknown(defaults.values, OUR_KEYS, f"node defaults file {defaults.path}")
    for nested, keys in _NESTED_KEYS.items():
        for source in (raw_config, defaults.values):
            if isinstance(source.get(nested), dict):
                _warn_unknown(source[nested], keys, "network config", prefix=f"{nested}.")
    # logOptions is merged by effective_log_options (the model's validator), not here.
    merged = _merge({k: v for k, v in defaults.values.items() if k in OUR_KEYS and k != "logOptions"},
                    {k: v for k, v in raw_config.items() if k in OUR_KEYS})
    try:
        config = PluginConfig.model_validate(merged, context={"node_defaults": defaults.values})
    except ValidationError as exc:
        raise _translate(exc, raw_config, defaults) from None
    node_table = defaults.values.get("hostRuleTable", HOST_RULE_TABLE)
    if config.allowed_host_rule_tables is None and config.host_rule_table != node_table:
        # A tenant's NetworkAttachmentDefinition may not pick the node's table: the node rule
        # `from all lookup <hostRuleTable>` precedes main, so naming a table the node uses for
        # its own policy would send all node traffic through it. Only the node's own table (or
        # what the node defaults file's allowedHostRuleTables lists) is accepted.
        raise InvalidConfig(
            f"key `hostRuleTable`: value `{config.host_rule_table}` is not valid; expected one "
            f"of the node's allowedHostRuleTables [{node_table}] (a node may allow more tables "
            f"in its defaults file {defaults.path})")
    if config.host_rp_filter is not None:
        log.warning("key `hostRPFilter` is deprecated and ignored (the node's rp_filter is "
                    "not route-tune's to change)")
    return config


def load(raw_config: Mapping, environ: Mapping[str, str]) -> PluginConfig:
    """Read the node defaults file named by ``environ`` and validate ``raw_config`` on top of it."""
    return build(raw_config, read_node_defaults(environ))
