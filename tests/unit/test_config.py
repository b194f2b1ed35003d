"""PluginConfig: defaults, precedence, node-only keys, and every validation rule (in-process)."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from cniplugin.protocol.config import NODE_ONLY_KEYS, load, parse_go_duration
from cniplugin.protocol.errors import InvalidConfig


@pytest.fixture
def environ(tmp_path) -> dict[str, str]:
    """Points at a defaults file that does not exist yet (tests write it when they need one)."""
    return {"ROUTE_TUNE_DEFAULTS": str(tmp_path / "defaults.json")}


def write_defaults(environ: dict, values) -> None:
    with open(environ["ROUTE_TUNE_DEFAULTS"], "w") as handle:
        handle.write(values if isinstance(values, str) else json.dumps(values))


def bad(environ, **keys) -> str:
    with pytest.raises(InvalidConfig) as err:
        load({"name": "n", **keys}, environ)
    assert err.value.code == 7
    return err.value.msg


def test_defaults(environ, tmp_path):
    write_defaults(environ, {"logDir": str(tmp_path)})
    c = load({"name": "n", "type": "route-tune", "cniVersion": "1.0.0"}, environ)
    assert (c.mode, c.pod_default_cni_nic, c.tune_pod_routes, c.pod_default_route_nic,
            c.host_rule_table, c.host_rule_priority, c.pod_rp_filter, c.overlay_pod_cidr,
            c.service_cidr, c.hijack_cidr, c.policy_routes, c.tx_queue_len, c.detect_gateway,
            c.detect_ip_conflict, c.pod_mac_prefix, c.veth_link_address, c.veth_mtu,
            c.state_dir, c.socket_path, c.allowed_host_rule_tables) == (
        "auto", "eth0", True, "", 500, 1000, 0, [], [], [], [], 0, False, False, "", None, 1500,
        "/run/route-tune", "/run/route-tune/engine.sock", None)
    assert (c.detect_options.retries, c.detect_options.interval, c.detect_options.timeout) == \
        (3, 0.01, 0.1)
    assert (c.log_options.level, c.log_options.file, c.log_options.max_count) == \
        (logging.INFO, str(tmp_path / "route-tune.log"), 10)


def test_missing_defaults_file_is_fine_and_builtin_log_dir_applies(environ):
    c = load({"name": "n"}, environ)
    assert c.log_dir == "/var/log/route-tune"
    assert c.log_options.file == "/var/log/route-tune/route-tune.log"


def test_precedence_builtin_file_conflist_one_level_deep(environ, tmp_path):
    write_defaults(environ, {"logDir": str(tmp_path), "hostRuleTable": 600, "podRPFilter": 2,
                             "allowedHostRuleTables": [600, 700],
                             "hostRulePriority": 900, "detectOptions": {"retries": 5},
                             "logOptions": {"logLevel": "debug", "logMaxCount": 4}})
    c = load({"name": "n", "hostRuleTable": 700, "detectOptions": {"timeout": "1s"},
              "logOptions": {"logFile": "x.log"}}, environ)
    assert (c.host_rule_table, c.pod_rp_filter, c.host_rule_priority) == (700, 2, 900)
    assert (c.detect_options.retries, c.detect_options.timeout) == (5, 1.0)
    assert (c.log_options.level, c.log_options.max_count, c.log_options.file) == (
        logging.DEBUG, 4, str(tmp_path / "x.log"))


@pytest.mark.parametrize("key", NODE_ONLY_KEYS)
def test_node_only_keys_are_refused_in_a_conflist(environ, key):
    msg = bad(environ, **{key: "/tmp" if key.endswith(("Dir", "Path")) else 1})
    assert f"`{key}`" in msg and "set it in the node defaults file" in msg


@pytest.mark.parametrize("content, needle", [("{not json", "is not valid JSON"),
                                             ("[1]", "must hold a JSON object")])
def test_invalid_defaults_file_is_code_7_naming_it(environ, content, needle):
    write_defaults(environ, content)
    msg = bad(environ)
    assert environ["ROUTE_TUNE_DEFAULTS"] in msg and needle in msg


def test_unreadable_defaults_file_is_code_7(environ, tmp_path):
    environ["ROUTE_TUNE_DEFAULTS"] = str(tmp_path)  # a directory cannot be read as a file
    assert str(tmp_path) in bad(environ)


def test_bad_value_from_the_defaults_file_names_the_file(environ):
    write_defaults(environ, {"hostRuleTable": 255})
    assert "node defaults file" in bad(environ)


@pytest.mark.parametrize("mode, want", [("auto", "auto"), ("overlay", "overlay"),
                                        ("underlay", "underlay"), ("disabled", "disabled"),
                                        ("disable", "disabled")])
def test_modes(environ, mode, want):
    assert load({"name": "n", "mode": mode}, environ).mode == want


@pytest.mark.parametrize("key, value, needle", [
    ("mode", "Auto", "key `mode`: value `Auto`"),
    ("mode", "off", "'auto', 'overlay', 'underlay' or 'disabled'"),
    ("tunePodRoutes", "true", "key `tunePodRoutes`: value `true` is not valid"),
    ("podDefaultCniNic", "a/b", "valid interface name"),
    ("podDefaultRouteNic", "x" * 16, "valid interface name"),
    ("hostRuleTable", 0, "other than 253, 254, 255"),
    ("hostRuleTable", 253, "other than 253"),
    ("hostRuleTable", 254, "value `254`"),
    ("hostRuleTable", 255, "value `255`"),
    ("hostRuleTable", 2**32, "value `4294967296`"),
    ("hostRuleTable", "500", "integer"),
    ("podRPFilter", 3, "less than or equal to 2"),
    ("podRPFilter", -2, "greater than or equal to -1"),
    ("podARPIsolation", "false", "key `podARPIsolation`: value `false` is not valid"),
    ("podARPIsolation", {"arp_ignore": 8}, "valid boolean"),
    ("vethMTU", 0, "greater than 0"),
    ("vethMTU", -5, "key `vethMTU`: value `-5`"),
    ("txQueueLen", -1, "greater than or equal to 0"),
    ("podMACPrefix", "0g:11", "two hex bytes"),
    ("podMACPrefix", "01:02", "unicast"),
    ("podMACPrefix", "ff:02", "unicast"),
    ("podMACPrefix", "0a:0b:0c", "two hex bytes"),
    ("vethLinkAddress", "fd00::1", "IPv4"),
    ("vethLinkAddress", "300.1.1.1", "an IP address"),
    ("overlayPodCIDR", ["10.0.0.0/33"], "key `overlayPodCIDR[0]`: value `10.0.0.0/33`"),
    ("serviceCIDR", ["0.0.0.0/0"], "narrower than /0"),
    ("hijackCIDR", ["::/0"], "key `hijackCIDR[0]`: value `::/0`"),
    ("hijackCIDR", "169.254.0.0/16", "valid list"),
    ("policyRoutes", [{"dst": "10.1.0.0/16", "gw": "fd00::1"}], "same IP family"),
    ("policyRoutes", [{"dst": "10.1.0.0/16", "gw": "nope"}], "key `policyRoutes[0].gw`"),
    ("policyRoutes", [{"dst": "10.1.0.0/16"}], "policyRoutes[0].gw"),
    ("detectOptions", {"retries": 0}, "key `detectOptions.retries`"),
    ("detectOptions", {"timeout": "100"}, "Go duration"),
    ("detectOptions", {"interval": "-1s"}, "Go duration"),
    ("detectOptions", {"timeout": "0s"}, "greater than 0"),
    ("logOptions", {"logLevel": "loud"}, "key `logOptions.logLevel`: value `loud`"),
    ("logOptions", {"logFile": "/var/log/spidernet/coordinator.log"}, "not allowed"),
])
def test_validation_errors_name_key_and_value(environ, key, value, needle):
    msg = bad(environ, **{key: value})
    assert needle in msg, msg
    assert msg.startswith("key `") or "logOptions" in msg


def test_arp_isolation_defaults_on_and_is_a_plain_switch(environ):
    """Safe for RDMA by default; a tenant can only turn it off (no sysctl names or values)."""
    assert load({"name": "n"}, environ).pod_arp_isolation is True
    assert load({"name": "n", "podARPIsolation": False}, environ).pod_arp_isolation is False
    write_defaults(environ, {"podARPIsolation": False})
    assert load({"name": "n"}, environ).pod_arp_isolation is False
    assert load({"name": "n", "podARPIsolation": True}, environ).pod_arp_isolation is True


def test_host_rule_table_is_the_nodes_unless_the_node_allows_more(environ):
    """A NetworkAttachmentDefinition is tenant-writable: by default it cannot move the node rule
    `from all lookup <hostRuleTable>` onto a table the node uses for its own policy."""
    assert load({"name": "n", "hostRuleTable": 500}, environ).host_rule_table == 500
    assert "allowedHostRuleTables [500]" in bad(environ, hostRuleTable=600)
    write_defaults(environ, {"hostRuleTable": 600})
    assert load({"name": "n"}, environ).host_rule_table == 600
    assert "allowedHostRuleTables [600]" in bad(environ, hostRuleTable=500)


def test_host_rule_table_must_be_in_the_node_allowlist(environ):
    write_defaults(environ, {"allowedHostRuleTables": [500, 501]})
    assert load({"name": "n", "hostRuleTable": 501}, environ).host_rule_table == 501
    assert "allowedHostRuleTables" in bad(environ, hostRuleTable=502)


def test_all_problems_are_reported(environ):
    with pytest.raises(InvalidConfig) as err:
        load({"name": "n", "podRPFilter": 9, "vethMTU": 0, "txQueueLen": -1}, environ)
    assert "podRPFilter" in err.value.msg
    assert "vethMTU" in err.value.details and "txQueueLen" in err.value.details


def test_a_hint_is_given_once(environ):
    """Two entries wrong the same way: the hint is in msg only (libcni prints "msg; details",
    so details must not repeat it)."""
    with pytest.raises(InvalidConfig) as err:
        load({"name": "n", "overlayPodCIDR": ["", "x"]}, environ)
    assert (err.value.msg, err.value.details) == (
        "key `overlayPodCIDR[0]`: value `` is not valid; expected a CIDR such as 10.0.0.0/16 or "
        "a bare IP", "key `overlayPodCIDR[1]`: value `x` is not valid")


def test_cidrs_are_normalised(environ):
    c = load({"name": "n", "hijackCIDR": ["169.254.25.10", "fd00::10", "10.1.2.3/16"],
              "policyRoutes": [{"dst": "192.168.9.9", "gw": "10.0.0.1"}],
              "podMACPrefix": "0A-1b", "vethLinkAddress": "169.254.200.1"}, environ)
    assert [str(n) for n in c.hijack_cidr] == ["169.254.25.10/32", "fd00::10/128", "10.1.0.0/16"]
    assert (str(c.policy_routes[0].dst), c.policy_routes[0].gw) == (
        "192.168.9.9/32", ipaddress.ip_address("10.0.0.1"))
    assert (c.pod_mac_prefix, str(c.veth_link_address)) == ("0a:1b", "169.254.200.1")


@pytest.mark.parametrize("text, seconds", [("100ms", 0.1), ("1s", 1.0), ("1.5s", 1.5),
                                           ("500us", 0.0005), ("500µs", 0.0005), ("2m", 120.0),
                                           ("1m30s", 90.0), ("1h", 3600.0), ("0", 0.0),
                                           ("10ns", 1e-8), (".5s", 0.5)])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "100", "1x", "ms", "1.5", "-1s", "1 s", "1s ", "s1", 5])
def test_go_durations_reject_garbage(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_runtime_and_unknown_keys_are_ignored_and_typos_warned(environ, caplog):
    raw = {"name": "n", "cniVersion": "1.0.0", "type": "route-tune", "prevResult": {},
           "runtimeConfig": {"mac": "x"}, "args": {"cni": {}}, "capabilities": {"mac": True},
           "ipam": {}, "dns": {}, "cni.dev/valid-attachments": [], "somethingElse": 1,
           "hostRuleTabel": 7, "podrpfilter": 1, "logOptions": {"logLevle": "debug"},
           "multusNicPrefix": "net", "hostRPFilter": 1}
    logger = logging.getLogger("cniplugin")  # may not propagate once the plugin set it up
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="cniplugin"):
            c = load(raw, environ)
    finally:
        logger.removeHandler(caplog.handler)
    assert (c.host_rule_table, c.pod_rp_filter) == (500, 0)
    text = caplog.text
    assert "`hostRuleTabel`" in text and "`hostRuleTable`" in text
    assert "`podrpfilter`" in text and "`podRPFilter`" in text
    assert "`logOptions.logLevle`" in text and "`logOptions.logLevel`" in text
    assert "hostRPFilter" in text and "deprecated" in text
    assert "somethingElse" not in text and "cni.dev" not in text and "capabilities" not in text
