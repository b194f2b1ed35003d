"""The one exception tree of route-tune, and the one table mapping it to CNI error codes.

    CNIError                         code  when
    ├── IncompatibleVersion             1  config version not supported; CHECK < 0.4.0; GC/STATUS < 1.1.0
    ├── UnsupportedField                2  a config field route-tune cannot honour (names key and value)
    ├── UnknownContainer                3  the container / netns does not exist (ADD, CHECK)
    ├── InvalidEnvironment              4  missing or malformed CNI_* environment variables
    ├── IOFailure                       5  stdin or a file could not be read/written
    ├── DecodeFailure                   6  stdin is not JSON, or a version string is malformed
    ├── InvalidConfig                   7  the network config fails validation (names key and value)
    │   └── NotChained                  7  ADD without prevResult: route-tune must follow an interface plugin
    ├── TryAgainLater                  11  transient: a retry may succeed
    │   ├── GatewayUnreachable         11  the pool gateway did not answer ARP/NDP
    │   └── Busy                       11  a lock could not be taken in time
    ├── PluginNotAvailable             50  STATUS: cannot take ADDs now
    ├── PluginError                   100  generic plugin failure (base of route-tune's own codes)
    │   ├── IPConflict                101  the interface's address is in use by another MAC
    │   ├── InterfaceNotFound         102  CNI_IFNAME (or a named NIC) is not in the pod
    │   ├── RouteConflict             103  the kernel refused a rule/route/neighbour (conflict, bad next hop)
    │   ├── CheckFailed               104  CHECK found drift between the recorded and the live state
    │   ├── UnderlayNotReady          105  underlay on a later NIC but no veth0 from the first invocation
    │   ├── NetfilterError            106  the nftables reply-steering table could not be applied
    │   └── UnsafeRequest             107  refused for the node's safety (e.g. pod IP is a node address)
    └── InternalError                999  anything unexpected; traceback only in the log

Errors become CNI replies only at the edge (``protocol.dispatch``, and the forwarding client's
code-11 reply), both through ``error_reply``; everything else raises.
"""

from __future__ import annotations

__all__ = [
    "CNIError", "IncompatibleVersion", "UnsupportedField", "UnknownContainer",
    "InvalidEnvironment", "IOFailure", "DecodeFailure", "InvalidConfig", "NotChained",
    "TryAgainLater", "GatewayUnreachable", "Busy", "PluginNotAvailable", "PluginError",
    "IPConflict", "InterfaceNotFound", "RouteConflict", "CheckFailed", "UnderlayNotReady",
    "NetfilterError", "UnsafeRequest", "InternalError", "ERROR_CODES", "error_reply",
]

#: How ``json.dumps`` writes these characters inside a string (other controls: ``\\u00XX``).
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                  "\b": "\\b", "\f": "\\f"}


class CNIError(Exception):
    """Base of every error route-tune reports to the runtime.

    ``details`` only adds to ``msg`` (libcni prints ``msg; details``): never repeat in it what
    ``msg`` already says.
    """

    code = 999
    #: The version the reply speaks, once the request's version is negotiated (else None: the
    #: replier falls back to the config's declared version, or the newest).
    cni_version: str | None = None

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def reply(self, cni_version: str) -> bytes:
        """This error as the CNI error object the plugin prints."""
        return error_reply(cni_version, self.code, self.msg, self.details)


def error_reply(cni_version: str, code: int, msg: str, details: str = "") -> bytes:
    """A CNI error object exactly as Go's ``PrintResult`` writes it (``MarshalIndent`` with four
    spaces, no trailing newline; ``details`` left out when empty): the one builder, for
    dispatch and the forwarding client alike.

    Written out rather than json-encoded: the forwarding client answers with it on its failure
    path and imports no ``json`` (nor ``re``, ``enum``) to do so.
    """
    out = '{\n    "cniVersion": "' + _quote(cni_version) + '",\n    "code": ' + str(int(code))
    out += ',\n    "msg": "' + _quote(msg) + '"'
    if details:
        out += ',\n    "details": "' + _quote(details) + '"'
    return (out + "\n}").encode("utf-8", "replace")


def _quote(text: str) -> str:
    """A JSON string's body as ``json.dumps(ensure_ascii=False)`` writes it."""
    return "".join(_SHORT_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ch < " " else ch)
                   for ch in text)


class IncompatibleVersion(CNIError):
    code = 1


class UnsupportedField(CNIError):
    code = 2


class UnknownContainer(CNIError):
    code = 3


class InvalidEnvironment(CNIError):
    code = 4


class IOFailure(CNIError):
    code = 5


class DecodeFailure(CNIError):
    code = 6


class InvalidConfig(CNIError):
    code = 7


class NotChained(InvalidConfig):
    pass


class TryAgainLater(CNIError):
    code = 11


class GatewayUnreachable(TryAgainLater):
    pass


class Busy(TryAgainLater):
    pass


class PluginNotAvailable(CNIError):
    code = 50


class PluginError(CNIError):
    code = 100


class IPConflict(PluginError):
    code = 101


class InterfaceNotFound(PluginError):
    code = 102


class RouteConflict(PluginError):
    code = 103


class CheckFailed(PluginError):
    code = 104


class UnderlayNotReady(PluginError):
    code = 105


class NetfilterError(PluginError):
    code = 106


class UnsafeRequest(PluginError):
    code = 107


class InternalError(CNIError):
    code = 999


#: code -> exception class, the single table (documentation, tests and the CLI read it).
ERROR_CODES = {
    cls.code: cls
    for cls in (
        IncompatibleVersion, UnsupportedField, UnknownContainer, InvalidEnvironment, IOFailure,
        DecodeFailure, InvalidConfig, TryAgainLater, PluginNotAvailable, PluginError, IPConflict,
        InterfaceNotFound, RouteConflict, CheckFailed, UnderlayNotReady, NetfilterError,
        UnsafeRequest, InternalError,
    )
}
