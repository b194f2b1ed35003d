"""What the runtime and the node hand the plugin: CNI_* variables, CNI_ARGS, the node defaults file.

Stdlib only: VERSION, the about text and a DEL whose netns is gone go through this module and must
stay cheap. Validation follows the reference Go ``skel`` (libcni's plugin side):

- all missing required variables are named in ONE error (code 4);
- ``CNI_NETNS`` is optional for DEL; ``CNI_PATH`` is required for ADD, DEL, CHECK, GC and STATUS
  (Go requires it even though the spec does not; runtimes always set it);
- ``CNI_IFNAME`` must be 1..15 bytes, not ``.``/``..``, without ``/``, ``:`` or whitespace;
- ``CNI_CONTAINERID`` must match ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``;
- an unknown ``CNI_COMMAND`` is code 4 naming it.
"""

from __future__ import annotations

import json
import os
import re

from cniplugin.protocol.errors import InvalidConfig, InvalidEnvironment

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping

__all__ = [
    "COMMANDS", "CniArgs", "CniEnv", "NodeDefaults", "parse_env", "parse_cni_args",
    "validate_ifname", "validate_container_id", "read_node_defaults", "DEFAULTS_PATH",
]

#: Every command route-tune answers; VERSION needs nothing but CNI_COMMAND.
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

#: variable -> commands that require it (the skel table; GC/STATUS as in Go HEAD).
_REQUIRED_FOR = {
    "CNI_CONTAINERID": ("ADD", "DEL", "CHECK"),
    "CNI_NETNS": ("ADD", "CHECK"),
    "CNI_IFNAME": ("ADD", "DEL", "CHECK"),
    "CNI_PATH": ("ADD", "DEL", "CHECK", "GC", "STATUS"),
}

_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
_IFNAMSIZ = 16  # kernel limit incl. the trailing NUL

#: Where the node's defaults live; the DaemonSet may point elsewhere with ROUTE_TUNE_DEFAULTS.
DEFAULTS_PATH = "/etc/cni/route-tune/defaults.json"
DEFAULTS_ENV = "ROUTE_TUNE_DEFAULTS"


class Record:
    """A small immutable record: what ``@dataclass(frozen=True)`` gave these classes (construction
    by position or keyword with defaults, ``==``, ``hash`` and ``repr`` over the fields, no
    assignment), written out because ``dataclasses`` imports ``inspect`` (and with it ``ast``,
    ``dis``, ``tokenize``): more than the rest of a light command (VERSION, DEL of a gone netns).

    Subclasses list ``_fields`` and ``_defaults`` (values, or ``_new`` callables for mutable ones),
    and may override ``_check`` (``__post_init__``: runs once the fields are set).
    """

    _fields: tuple[str, ...] = ()
    _defaults: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments, "
                            f"{len(args)} given")
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}() got an unexpected or repeated "
                                f"argument {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                if name not in self._defaults:
                    raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
                default = self._defaults[name]
                values[name] = default() if isinstance(default, _new) else default
        self.__dict__.update(values)  # instance dict, so copy and pickle work as before
        self._check()

    def _check(self) -> None:
        """Validate the fields together (a subclass's invariants); raise to refuse the record."""

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace``), checked again."""
        return type(self)(**{**self._asdict(), **changes})

    def _values(self) -> tuple:
        return tuple(self.__dict__[name] for name in self._fields)

    def _asdict(self) -> dict:
        """The fields as a dict (``dataclasses.asdict`` for these flat records)."""
        return {name: self.__dict__[name] for name in self._fields}

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"


class _new:
    """A default built fresh for each record (dataclass ``default_factory``)."""

    __slots__ = ("factory",)

    def __init__(self, factory) -> None:
        self.factory = factory

    def __call__(self):
        return self.factory()


class CniArgs(Record):
    """CNI_ARGS as Multus sends it: ``IgnoreUnknown=true;K8S_POD_NAMESPACE=..;...;MAC=..;IP=a,b``.

    ``pairs`` keeps every well-formed pair in order, duplicates included. Multus appends the runtime's
    own pairs after its K8S_* ones, and Go's ``LoadArgs`` lets the later assignment win, so ``get``
    returns the LAST NON-EMPTY value of a key (an empty duplicate never blanks a real value).
    Segments that are not ``K=V`` with a non-empty key are kept in ``invalid`` and otherwise ignored:
    CNI_ARGS is advisory for route-tune (pod identity in logs), never a reason to fail an ADD.
    """

    _fields = ("pairs", "invalid")
    _defaults = {"pairs": (), "invalid": ()}
    pairs: tuple[tuple[str, str], ...]
    invalid: tuple[str, ...]

    def get(self, key: str, default: str = "") -> str:
        """The last non-empty value of ``key`` (see the class docstring), else ``default``."""
        for name, value in reversed(self.pairs):
            if name == key and value:
                return value
        return default

    def get_all(self, key: str) -> tuple[str, ...]:
        """Every value given for ``key``, in order, empty ones included."""
        return tuple(value for name, value in self.pairs if name == key)

    @property
    def ignore_unknown(self) -> bool:
        return self.get("IgnoreUnknown").lower() in ("1", "true")

    @property
    def pod_namespace(self) -> str:
        return self.get("K8S_POD_NAMESPACE")

    @property
    def pod_name(self) -> str:
        return self.get("K8S_POD_NAME")

    @property
    def pod_uid(self) -> str:
        return self.get("K8S_POD_UID")

    @property
    def infra_container_id(self) -> str:
        return self.get("K8S_POD_INFRA_CONTAINER_ID")

    @property
    def mac(self) -> str:
        return self.get("MAC")

    @property
    def ips(self) -> tuple[str, ...]:
        """``IP=a,b`` split on commas, blanks dropped (strings; not validated here)."""
        return tuple(part.strip() for part in self.get("IP").split(",") if part.strip())


def parse_cni_args(text: str) -> CniArgs:
    """Parse a CNI_ARGS string; never raises (see ``CniArgs`` for the rules)."""
    pairs: list[tuple[str, str]] = []
    invalid: list[str] = []
    for segment in text.split(";"):
        if not segment:
            continue
        key, sep, value = segment.partition("=")
        if not sep or not key:
            invalid.append(segment)
            continue
        pairs.append((key, value))
    return CniArgs(tuple(pairs), tuple(invalid))


class CniEnv(Record):
    """The validated CNI_* variables of one invocation."""

    _fields = ("command", "container_id", "netns", "ifname", "args", "path")
    _defaults = {"container_id": "", "netns": "", "ifname": "", "args": _new(CniArgs),
                 "path": ""}
    command: str
    container_id: str
    netns: str
    ifname: str
    args: CniArgs
    path: str

    @property
    def path_dirs(self) -> tuple[str, ...]:
        return tuple(p for p in self.path.split(os.pathsep) if p)


def validate_ifname(name: str) -> None:
    """Raise code 4 unless ``name`` is a usable Linux interface name (Go's ValidateInterfaceName)."""
    if not name:
        raise InvalidEnvironment("interface name is empty")
    if len(name.encode()) > _IFNAMSIZ - 1:
        raise InvalidEnvironment("interface name is too long",
                                 f"interface name should be less than {_IFNAMSIZ} characters")
    if name in (".", ".."):
        raise InvalidEnvironment("interface name is . or ..")
    if any(ch in "/:" or ch.isspace() for ch in name):
        raise InvalidEnvironment("interface name contains / or : or whitespace characters")


def validate_container_id(container_id: str) -> None:
    """Raise code 4 unless the container id matches ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``."""
    if not container_id:
        raise InvalidEnvironment("missing containerID")
    if not _CONTAINER_ID_RE.match(container_id):
        raise InvalidEnvironment("invalid characters in containerID", container_id)


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    """Validate the CNI_* variables as Go skel does and return them; raises ``InvalidEnvironment``."""
    command = environ.get("CNI_COMMAND", "")
    missing = ["CNI_COMMAND"] if not command else []
    missing += [var for var, needed_by in _REQUIRED_FOR.items()
                if command in needed_by and not environ.get(var, "")]
    if missing:
        raise InvalidEnvironment(f"required env variables [{','.join(missing)}] missing")
    if command not in COMMANDS:
        raise InvalidEnvironment(f"unknown CNI_COMMAND: {command}")
    env = CniEnv(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )
    # GC and STATUS carry no attachment, so there is nothing to validate for them.
    if command in ("ADD", "DEL", "CHECK"):
        validate_container_id(env.container_id)
        validate_ifname(env.ifname)
    return env


class NodeDefaults(Record):
    """The node defaults file: its path and its top-level JSON object (empty when absent)."""

    _fields = ("path", "values")
    _defaults = {"values": _new(dict)}
    path: str
    values: dict


def read_node_defaults(environ: Mapping[str, str]) -> NodeDefaults:
    """Read the node defaults file (``ROUTE_TUNE_DEFAULTS`` or ``DEFAULTS_PATH``).

    A missing file is fine (built-in defaults apply); an unreadable or invalid one is code 7 naming
    the file, because silently ignoring a node's policy would be worse than failing the ADD.
    """
    path = environ.get(DEFAULTS_ENV) or DEFAULTS_PATH
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return NodeDefaults(path)
    except OSError as exc:
        raise InvalidConfig(f"node defaults file {path} cannot be read: {exc.strerror}") from None
    try:
        values = json.loads(data)
    except ValueError as exc:
        raise InvalidConfig(f"node defaults file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise InvalidConfig(f"node defaults file {path} must hold a JSON object")
    return NodeDefaults(path, values)
