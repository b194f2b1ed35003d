"""Static version facts. Kept import-free: VERSION and --version read only this module."""

__version__ = "0.1.0"

PLUGIN_NAME = "route-tune"

#: CNI spec versions route-tune speaks (0.1.0/0.2.0 have no chaining, so they are refused).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

#: Routing protocol number stamped on every rule, route and neighbour route-tune installs.
#: DEL, CHECK and GC select route-tune's own objects by it and never guess.
RTPROT_ROUTE_TUNE = 231
