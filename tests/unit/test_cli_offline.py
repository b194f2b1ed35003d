"""``cni-route-tune`` without any namespace: help, cheap start-up, usage errors (exit 2) and
``plan`` from saved files alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cniplugin.cli import main as _cli
from harness.host import CNI_ROUTE_TUNE

READ_COMMANDS = ["show", "facts", "plan", "verify", "explain", "replay", "probe", "orphans"]

RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "net1", "mac": "0a:58:ac:10:0b:0a", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "172.16.11.10/24", "gateway": "172.16.11.254", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "172.16.11.254"}],
}
CONFLIST = {"cniVersion": "1.0.0", "name": "rail1", "plugins": [
    {"type": "macvlan", "master": "rail1"}, {"type": "route-tune", "podRPFilter": 2}]}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNI_ROUTE_TUNE), *args], capture_output=True, text=True, env=env)


def test_help_lists_commands_and_exit_codes():
    out = run("--help")
    assert out.returncode == 0
    for name in READ_COMMANDS + ["install", "serve", "demo"]:
        assert f"\n  {name:<10} " in out.stdout
    assert "  3  the network namespace (or pod) does not exist" in out.stdout
    for name in READ_COMMANDS:
        sub = run(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "exit codes" in sub.stdout and "--json" in sub.stdout


def test_startup_imports_neither_pyroute2_nor_pydantic():
    code = ("import sys\nfrom cniplugin.cli.main import main\n"
            "for argv in (['--help'], ['show', '--help'], ['plan', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("route-tune ")


@pytest.mark.parametrize("args,message", [
    (["nosuch"], "invalid choice"),
    (["show"], "--netns"),
    (["plan", "--config", "/nonexistent/x.conflist"], "No such file"),
    (["explain", "not-an-ip", "--netns", "x"], "does not appear to be an IPv4 or IPv6"),
    (["explain", "10.0.0.1", "--from", "fd00::1", "--netns", "x"], "different families"),
])
def test_usage_errors_exit_2(args, message):
    out = run(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr


def test_plan_input_problems_exit_2(tmp_path):
    other = tmp_path / "other.conflist"
    other.write_text(json.dumps({**CONFLIST, "plugins": CONFLIST["plugins"][:1]}))
    out = run("plan", "--config", str(other))
    assert out.returncode == 2 and "no route-tune entry" in out.stderr
    bad = tmp_path / "bad.conflist"
    bad.write_text(json.dumps({**CONFLIST, "plugins": [{"type": "route-tune",
                                                         "hostRuleTable": 254}]}))
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps(RESULT))
    out = run("plan", "--config", str(bad), "--prev-result", str(prev))
    assert out.returncode == 2 and "hostRuleTable" in out.stderr
    both = tmp_path / "net.d"
    both.mkdir()
    (both / "10-rail1.conflist").write_text(json.dumps(CONFLIST))
    (both / "20-rail2.conflist").write_text(json.dumps({**CONFLIST, "name": "rail2"}))
    out = run("plan", "--config", str(both), "--prev-result", str(prev))
    assert out.returncode == 2 and "pick one with --network" in out.stderr
    out = run("plan", "--config", str(both), "--network", "rail2", "--prev-result", str(prev))
    assert out.returncode == 0, out.stderr
    assert "# plan: ADD of net1 for network rail2 (container cni-route-tune)" in out.stdout


def test_plan_from_a_captured_stdin_and_env_file(tmp_path):
    stdin = tmp_path / "stdin.json"
    stdin.write_text(json.dumps({**CONFLIST["plugins"][1], "name": "rail1",
                                 "cniVersion": "1.0.0", "prevResult": RESULT}))
    env = tmp_path / "env"
    env.write_text("# captured\nexport CNI_IFNAME=net1\nCNI_CONTAINERID='abc'\n")
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"stateDir": str(tmp_path / "state")}))
    out = run("plan", "--config", str(stdin), "--env", str(env), "--defaults", str(defaults),
              "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["ifname"], data["container_id"], data["network"]) == ("net1", "abc", "rail1")
    assert "sysctl -w net/ipv4/conf/net1/rp_filter=2" in data["lines"]
    assert "ip route replace default via 172.16.11.254 dev net1 table 101 proto 231" \
        in data["lines"]
    # IPAM's default route via net1 is displaced from main (and restored on DEL).
    assert any(line.startswith("ip route del 0.0.0.0/0 via 172.16.11.254 dev net1")
               for line in data["lines"])


def test_env_file_formats(tmp_path):
    lines = tmp_path / "lines"
    lines.write_text("A=1\n\n# c\nexport B='two words'\nC=\"x=y\"\n")
    assert _cli.read_env_file(str(lines)) == {"A": "1", "B": "two words", "C": "x=y"}
    environ = tmp_path / "environ"
    environ.write_bytes(b"A=1\0B=x y\0")
    assert _cli.read_env_file(str(environ)) == {"A": "1", "B": "x y"}
    as_json = tmp_path / "env.json"
    as_json.write_text('{"A": 1}')
    assert _cli.read_env_file(str(as_json)) == {"A": "1"}
    broken = tmp_path / "broken"
    broken.write_text("just words\n")
    with pytest.raises(_cli.UsageError, match="expected KEY=VALUE"):
        _cli.read_env_file(str(broken))


def test_plan_from_a_libcni_cache_file(tmp_path):
    """The runtime's result cache holds the conflist and the final result: enough to plan."""
    import base64
    cache = tmp_path / "rail1-abc-net1"
    cache.write_text(json.dumps({
        "kind": "cniCacheV1", "containerId": "abc", "ifName": "net1", "networkName": "rail1",
        "config": base64.b64encode(json.dumps(CONFLIST).encode()).decode(), "result": RESULT}))
    out = run("plan", "--config", str(cache), "--container-id", "abc")
    assert out.returncode == 0, out.stderr
    assert "ip rule add from 172.16.11.10/32 lookup 101 pref 31000 proto 231" in out.stdout
