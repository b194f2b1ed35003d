"""One kernel vocabulary: the live-only fields of Rule/Route/Neighbour never change the
state-file or facts JSON of planned objects, and round-trip when set."""

from __future__ import annotations

import json

from cniplugin.cli.iptext import text, to_json
from cniplugin.records.facts import Facts, PodFacts
from cniplugin.records.objects import Neighbour, Route, Rule, object_from_dict, to_dict
from cniplugin.kernel.decode import _range


def test_planned_objects_keep_their_state_file_form():
    assert to_dict(Rule(4, 31000, 101, "10.0.0.1/32")) == {
        "kind": "rule", "family": 4, "priority": 31000, "table": 101, "src": "10.0.0.1/32",
        "proto": 231, "fwmark": 0, "fwmask": 0}
    assert to_dict(Neighbour(4, "eth0", "10.0.0.9", "02:00:00:00:00:01")) == {
        "kind": "neigh", "family": 4, "dev": "eth0", "ip": "10.0.0.9",
        "lladdr": "02:00:00:00:00:01"}
    assert set(to_dict(Route(4, 101, "0.0.0.0/0", "net1", "10.0.0.254"))) == {
        "kind", "family", "table", "dst", "dev", "gateway", "scope", "src", "metric", "proto"}


def test_live_fields_round_trip_through_json():
    objs = [Rule(4, 130, 0, "", proto=0, action="goto", goto=150, dst="192.0.2.0/24",
                 invert=True, other=("tos 0x10",), selectors=True),
            Route(4, 205, "100.64.0.0/10", "", proto=0, type="unicast", dead=True,
                  nexthops=(("va", "10.9.0.254"), ("vb", "10.8.0.254"))),
            Neighbour(4, "d0", "10.7.0.253", "02:00:00:00:00:02", permanent=False, proto=4)]
    for obj in objs:
        assert object_from_dict(json.loads(json.dumps(to_dict(obj)))) == obj


def test_facts_rules_keep_their_kindless_form():
    rule = Rule(4, 100, 202, "", proto=0, fwmark=0x10, fwmask=0xFF, selectors=True)
    facts = Facts(pod=PodFacts(rules=(rule,), owned_rules=(Rule(4, 31000, 101, "10.0.0.1/32"),)))
    data = json.loads(json.dumps(facts.to_dict()))
    assert data["pod"]["rules"] == [{"family": 4, "priority": 100, "table": 202, "src": "",
                                     "proto": 0, "fwmark": 16, "fwmask": 255,
                                     "selectors": True}]
    assert data["pod"]["owned_rules"][0]["kind"] == "rule"
    assert Facts.from_dict(data) == facts


def test_ip_style_text_and_json():
    route = Route(4, 205, "100.64.0.0/10", "", proto=0,
                  nexthops=(("va", "10.9.0.254"), ("vb", "10.8.0.254")))
    assert text(route) == ("100.64.0.0/10 nexthop via 10.9.0.254 dev va "
                           "nexthop via 10.8.0.254 dev vb")
    assert list(to_json(route)) == ["family", "table", "type", "dst", "dev", "gateway", "scope",
                                    "src", "metric", "proto", "nexthops", "dead", "text", "owner"]
    rule = Rule(4, 130, 0, "10.9.0.0/16", proto=0, action="goto", goto=150,
                dst="192.0.2.0/24", invert=True)
    assert text(rule) == "130: not from 10.9.0.0/16 to 192.0.2.0/24 goto 150"
    assert to_json(Neighbour(4, "d0", "10.7.0.254", "02:00:00:00:00:01"))["owner"] == "route-tune"


def test_rule_ranges_in_both_pyroute2_forms():
    assert _range("1000:2000") == (1000, 2000)
    assert _range({"start": 53, "end": 53}) == (53, 53)
    assert _range(None) is None
