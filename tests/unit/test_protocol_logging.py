"""The JSON-lines log: fields, levels, logFile confinement, rotation under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from cniplugin.protocol.errors import InvalidConfig
from cniplugin.protocol.log import RotatingJsonFile, resolve_log_file, resolve_log_options
from harness.host import run_plugin

WRITERS, LINES = 8, 200


def _write_lines(path: str, writer: int, max_bytes: int, max_count: int) -> None:
    log = RotatingJsonFile(path)
    for line in range(LINES):
        data = json.dumps({"writer": writer, "line": line, "pad": "x" * 40}) + "\n"
        log.write(data.encode(), max_bytes, max_count)
    log.close()


def _run_writers(path: str, max_bytes: int, max_count: int) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_lines, args=(path, w, max_bytes, max_count))
             for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0


def _all_files(path: str) -> list[str]:
    directory, base = os.path.split(path)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(base))


def test_concurrent_writers_lose_no_line_across_rotations(tmp_path):
    path = str(tmp_path / "log" / "route-tune.log")
    _run_writers(path, max_bytes=4096, max_count=1000)
    seen = []
    for name in _all_files(path):
        with open(name) as handle:
            for raw in handle:
                record = json.loads(raw)  # every line is whole: no interleaving
                seen.append((record["writer"], record["line"]))
        assert os.path.getsize(name) <= 4096
    assert sorted(seen) == [(w, n) for w in range(WRITERS) for n in range(LINES)]
    assert len(_all_files(path)) > 10  # it really rotated
    assert oct(os.stat(tmp_path / "log").st_mode & 0o777) == oct(0o750)


def test_rotation_keeps_at_most_max_count_backups(tmp_path):
    path = str(tmp_path / "route-tune.log")
    _run_writers(path, max_bytes=2048, max_count=3)
    names = sorted(os.path.basename(n) for n in _all_files(path))
    assert names == ["route-tune.log", "route-tune.log.1", "route-tune.log.2", "route-tune.log.3"]
    for name in _all_files(path):  # whatever was kept is whole lines within the size limit
        assert os.path.getsize(name) <= 2048
        with open(name) as handle:
            assert all(json.loads(raw)["pad"] for raw in handle)


def test_log_file_must_stay_under_log_dir(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", log_dir / "escape")
    assert resolve_log_file("a.log", str(log_dir)) == str(log_dir / "a.log")
    assert resolve_log_file(str(log_dir / "sub" / "b.log"), str(log_dir)) == \
        str(log_dir / "sub" / "b.log")
    assert resolve_log_file("sub/../c.log", str(log_dir)) == str(log_dir / "c.log")
    for bad in ("../x.log", "/etc/passwd", "escape/x.log", ".", "", str(log_dir), "a\0b"):
        with pytest.raises(InvalidConfig) as err:
            resolve_log_file(bad, str(log_dir))
        assert err.value.code == 7 and "logOptions.logFile" in err.value.msg


@pytest.mark.parametrize("options, key", [
    ({"logLevel": "verbose"}, "logLevel"), ({"logMaxSize": -1}, "logMaxSize"),
    ({"logMaxCount": "3"}, "logMaxCount"), ({"logMaxAge": True}, "logMaxAge"),
])
def test_bad_log_options_are_code_7(tmp_path, options, key):
    with pytest.raises(InvalidConfig) as err:
        resolve_log_options(options, str(tmp_path))
    assert f"logOptions.{key}" in err.value.msg


def test_log_options_defaults_and_coordinator_names(tmp_path):
    options = resolve_log_options({"logLevel": "warn", "logMaxSize": 5, "logMaxCount": 2},
                                  str(tmp_path))
    assert (options.level, options.file, options.max_bytes, options.max_count) == (
        30, str(tmp_path / "route-tune.log"), 5 * 1024 * 1024, 2)


def test_plugin_log_lines_carry_the_request_identity(tmp_path):
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"logDir": str(tmp_path / "log")}))
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "rtA-c9", "CNI_NETNS": "/run/netns/rtA-q",
           "CNI_IFNAME": "net3", "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_DEFAULTS": str(defaults),
           "CNI_ARGS": "IgnoreUnknown=true;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=trainer-0"}
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled",
              "logOptions": {"logLevel": "debug", "logFile": "sub/rt.log"}}
    proc = run_plugin(env, config)  # no prevResult: a logged code-7 failure
    assert json.loads(proc.stdout)["code"] == 7
    lines = [json.loads(line) for line in (tmp_path / "log" / "sub" / "rt.log").open()]
    assert lines, "nothing logged"
    for line in lines:
        assert {k: line[k] for k in ("containerID", "netns", "ifname", "podNamespace",
                                     "podName", "command")} == {
            "containerID": "rtA-c9", "netns": "/run/netns/rtA-q", "ifname": "net3",
            "podNamespace": "team-a", "podName": "trainer-0", "command": "ADD"}
        assert {"ts", "level", "msg"} <= set(line)
    assert any(line["level"] == "debug" for line in lines)
    assert b"rtA-c9" in proc.stderr and b"debug" not in proc.stderr.lower()
