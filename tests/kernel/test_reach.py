"""``reach`` tells a reply that came back on another interface from one on the request's own:
the asymmetry route-tune exists to prevent, built by hand in two namespaces."""

from __future__ import annotations

from cniplugin.lab.topology import ip_batch
from harness.cli import cli
from harness.golden import assert_golden, mask_rtt, normalise
from harness.kernel import nsx
from harness.lab import NAMES

PEER = "10.71.9.9"


def test_reach_flags_a_reply_on_another_interface(make_netns):
    """The pod reaches PEER by a1; the peer answers 10.71.1.2 through b2, so the reply arrives
    on a2. Both paths (bound to a1's address, and unbound) are reported as failed, exit 1."""
    peer = make_netns("peer", ["addr add 10.71.9.9/32 dev lo"])
    pod = make_netns("pod", [
        f"link add a1 type veth peer name b1 netns {peer}",
        f"link add a2 type veth peer name b2 netns {peer}",
        "link set a1 up", "link set a2 up",
        "addr add 10.71.1.2/24 dev a1", "addr add 10.71.2.2/24 dev a2",
        f"route add {PEER}/32 via 10.71.1.1 dev a1"])
    a2_mac = ip_batch(["link show a2"], pod).split("link/ether ")[1].split()[0]
    ip_batch(["link set b1 up", "link set b2 up", "addr add 10.71.1.1/24 dev b1",
              "addr add 10.71.2.1/24 dev b2", "route add 10.71.1.2/32 dev b2",
              f"neigh add 10.71.1.2 lladdr {a2_mac} dev b2 nud permanent"], peer)
    # Loose reverse-path filtering would drop the reply before anyone sees where it came in.
    nsx(pod, "sysctl", "-qw", *[f"net.ipv4.conf.{c}.rp_filter=0" for c in ("all", "a1", "a2")])
    run = cli("reach", PEER, "--netns", pod, "--ifname", "a1", "--timeout", "500ms",
              "--attempts", "2")
    assert run.code == 1, run.out + run.err
    assert_golden(normalise(mask_rtt(run.out), NAMES.prefix), "cli/reach_asymmetric.txt")
