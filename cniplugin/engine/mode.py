"""Which mode a request runs in: ``auto`` resolved against the pod's links.

``engine.gather`` is the only caller in a request: it resolves the mode once, from the pod it
just read, and the planner takes that mode as an argument.
"""

from __future__ import annotations

from cniplugin.protocol.errors import InvalidConfig, UnderlayNotReady
from cniplugin.records.objects import UNDERLAY_VETH


def resolve_mode(config, ifname: str, pod_links: list[str]) -> str:
    """The effective mode: ``overlay``, ``underlay`` or ``disabled``.

    ``auto`` means underlay when route-tune runs for the pod's default NIC (podDefaultCniNic)
    or the underlay veth0 already exists (coordinator's rule), else overlay. ``pod_links`` are
    the pod's link names.
    """
    mode = config.mode  # PluginConfig holds it normalised
    eth0 = config.pod_default_cni_nic
    if mode == "disabled":
        return "disabled"
    has_veth = UNDERLAY_VETH in pod_links
    if mode == "auto":
        mode = "underlay" if ifname == eth0 or has_veth else "overlay"
    if mode == "underlay":
        if ifname != eth0 and not has_veth:
            raise UnderlayNotReady(
                f"underlay mode for {ifname!r} needs the pod's {UNDERLAY_VETH}, and it does not "
                f"exist: route-tune must run on {eth0} (podDefaultCniNic) first, in underlay "
                f"mode, to create {UNDERLAY_VETH}; add route-tune to the default network's "
                f"chain, after its macvlan/SR-IOV plugin")
        return "underlay"
    if mode != "overlay":
        raise InvalidConfig(f"mode: unknown value {mode!r}")
    if ifname == eth0:
        raise InvalidConfig(
            f"mode: overlay tunes secondary interfaces, but CNI_IFNAME {ifname!r} is "
            f"podDefaultCniNic; put route-tune after the secondary interface's plugin")
    if has_veth:
        raise InvalidConfig(
            f"mode: overlay, but the pod has {UNDERLAY_VETH}: its default network runs in "
            f"underlay mode; use mode: underlay (or auto) for {ifname!r}")
    return "overlay"
