"""route-tune: policy routing for multi-NIC Kubernetes pods, as a chained CNI plugin."""

from ._version import __version__

__all__ = ["__version__"]
