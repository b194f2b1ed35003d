"""`cni-route-tune install` against a temporary directory laid out like a node's filesystem.

The installed shim is really executed: a working `CNI_COMMAND=VERSION` reply proves the copied
runtime (interpreter + stdlib + site-packages) is self-contained.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from cniplugin.cli import install as _install
from cniplugin.cli.install import MARKER, InstallError, install, main
from cniplugin._version import SUPPORTED_VERSIONS
from cniplugin.transport import native
from harness.host import wait_until

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture
def node(tmp_path: Path) -> SimpleNamespace:
    """<tmp>/opt/cni/bin (exists, as on a node), <tmp>/opt/route-tune, <tmp>/etc/cni/route-tune."""
    (tmp_path / "opt/cni/bin").mkdir(parents=True)
    return SimpleNamespace(root=tmp_path, bin=tmp_path / "opt/cni/bin",
                           rt=tmp_path / "opt/route-tune",
                           defaults=tmp_path / "etc/cni/route-tune/defaults.json",
                           shim=tmp_path / "opt/cni/bin/route-tune")


@pytest.fixture(scope="module")
def image_runtime(tmp_path_factory) -> Path:
    """A prepared runtime tree, as the image ships it (frozen: later edits to the checkout of
    other engineers cannot change it between two installs of one test)."""
    base = tmp_path_factory.mktemp("image")
    (base / "bin").mkdir()
    install(base / "bin", base / "rt", version="image")
    return base / "rt/image"


def run_shim(shim: Path, *args: str, command: str | None = "VERSION") -> subprocess.CompletedProcess:
    env = dict(CLEAN_ENV, **({"CNI_COMMAND": command} if command else {}))
    return subprocess.run([str(shim), *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def assert_version_reply(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)


def shim_version(shim: Path) -> str:
    return _install._shim_version(shim)


def versions(rt: Path) -> set[str]:
    return {p.name for p in rt.iterdir()}


# ------------------------------------------------------------------ fresh install

def test_fresh_install_from_interpreter_is_self_contained(node):
    report = install(node.bin, node.rt)
    vdir = node.rt / report.version
    assert report.changed and vdir.is_dir() and (vdir / MARKER).is_file()
    assert node.shim.stat().st_mode & 0o777 == 0o755
    assert native.is_native(node.shim)   # a compiler is at hand: auto means native
    assert shim_version(node.shim) == report.version
    assert_version_reply(run_shim(node.shim))
    about = run_shim(node.shim, "--version", command=None)
    assert about.returncode == 0 and report.version in about.stdout
    # Every module comes from the copy: nothing from the checkout, the venv or /usr.
    probe = subprocess.run(
        [str(vdir / "bin/python3"), "-I", "-S", "-c",
         f"import sys;sys.path.append({str(vdir / json.loads((vdir / MARKER).read_text())['site'])!r});"
         "import cniplugin, pydantic_core, pyroute2, netaddr, json, ctypes;"
         "print('\\n'.join(m.__file__ for m in (cniplugin, pydantic_core, pyroute2, netaddr, json, ctypes)))"],
        env=CLEAN_ENV, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(vdir)) for line in probe.stdout.split()), probe.stdout
    assert not list(vdir.rglob("__editable__*"))
    assert not (vdir / "lib/python3.11/test").exists()


@pytest.mark.parametrize("forwarder", ["native", "script"])
def test_shim_names_the_host_path_not_the_write_path(node, image_runtime, forwarder):
    write_dir = node.root / "host/opt/route-tune"
    report = install(node.bin, write_dir, source_runtime=image_runtime, version="1.2.3",
                     host_runtime_dir="/opt/route-tune", forwarder=forwarder)
    data = node.shim.read_bytes()
    code = native.inprocess_code(["/opt/route-tune/1.2.3/lib/python3.11/site-packages"])
    if forwarder == "script":
        assert data.startswith(b"#!/bin/sh\n")
        assert f"exec /opt/route-tune/1.2.3/bin/python3 -I -S -c {shlex.quote(code)}".encode() in data
    else:
        assert native.is_native(node.shim) and b"/opt/route-tune/1.2.3/bin/python3\0" in data
        assert code.encode() + b"\0" in data
    assert str(node.root).encode() not in data
    assert shim_version(node.shim) == "1.2.3"
    assert (write_dir / "1.2.3/bin/python3").exists() and report.runtime_path.startswith(str(write_dir))


def test_both_forwarders_run_the_installed_runtime(node, image_runtime):
    for forwarder in ("script", "native"):
        report = install(node.bin, node.rt, source_runtime=image_runtime, version="1.0",
                         forwarder=forwarder)
        assert report.changed and f"({forwarder})" in report.actions[-1]
        assert_version_reply(run_shim(node.shim))
        about = run_shim(node.shim, "--version", command=None)
        assert about.returncode == 0 and about.stdout.startswith("route-tune ")


def test_a_prebuilt_forwarder_is_used_only_for_the_path_and_version_it_was_built_for(
        node, image_runtime, tmp_path, monkeypatch):
    tree = tmp_path / "image-with-forwarder"
    shutil.copytree(image_runtime, tree, symlinks=True)
    site = "lib/python3.11/site-packages"
    native.build(tree / _install.PREBUILT_FORWARDER, python="/opt/route-tune/2.0/bin/python3",
                 paths=[f"/opt/route-tune/2.0/{site}"], version="2.0")
    prebuilt = (tree / _install.PREBUILT_FORWARDER).read_bytes()
    monkeypatch.setenv("CC", "/nonexistent/cc")     # as in the image: no compiler
    report = install(node.bin, node.root / "host-rt", source_runtime=tree, version="2.0",
                     host_runtime_dir="/opt/route-tune")
    assert "(native)" in report.actions[-1] and node.shim.read_bytes() == prebuilt
    report = install(node.bin, node.root / "host-rt", source_runtime=tree, version="2.1",
                     host_runtime_dir="/opt/route-tune")
    assert "(script)" in report.actions[-1]           # built for 2.0, not 2.1: not used


def test_native_forwarder_without_a_compiler_is_refused_before_any_change(node, image_runtime,
                                                                          monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(InstallError, match="no C compiler"):
        install(node.bin, node.rt, source_runtime=image_runtime, version="1.0", forwarder="native")
    assert not node.rt.exists() and list(node.bin.iterdir()) == []
    report = install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    assert "(script)" in report.actions[-1]   # auto without a compiler: the script


# ------------------------------------------------------------------ idempotence, dry run

def test_second_run_changes_nothing_and_says_so(node, image_runtime, capsys):
    argv = ["--cni-bin-dir", str(node.bin), "--runtime-dir", str(node.rt),
            "--source-runtime", str(image_runtime), "--runtime-version", "1.0"]
    assert main(argv) == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [node.shim, node.rt / "1.0" / MARKER]}
    capsys.readouterr()
    assert main(argv) == 0
    assert "already installed; nothing changed" in capsys.readouterr().out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False


def test_dry_run_prints_the_plan_and_touches_nothing(node, image_runtime, capsys):
    src = node.root / "defaults-src.json"
    src.write_text('{"hostRuleTable": 500}')
    rc = main(["--cni-bin-dir", str(node.bin), "--runtime-dir", str(node.rt), "--dry-run",
               "--source-runtime", str(image_runtime), "--runtime-version", "1.0",
               "--defaults", str(src), "--defaults-dest", str(node.defaults)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "would copy runtime" in out and "would write shim" in out and "would install defaults" in out
    assert not node.rt.exists() and not node.defaults.exists() and list(node.bin.iterdir()) == []


# ------------------------------------------------------------------ upgrade, rollback, prune

LOOP = textwrap.dedent("""
    import json, os, subprocess, sys
    shim, stop, out = sys.argv[1:4]
    runs, failures = 0, []
    while not os.path.exists(stop):
        p = subprocess.run([shim], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        runs += 1
        try:
            json.loads(p.stdout)["supportedVersions"]
            assert p.returncode == 0
        except Exception:
            failures.append([p.returncode, p.stdout, p.stderr])
    json.dump({"runs": runs, "failures": failures}, open(out, "w"))
""")


def test_upgrade_flips_shim_while_the_old_one_keeps_running(node, image_runtime, tmp_path):
    install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    stop, out = tmp_path / "stop", tmp_path / "loop.json"
    loop = subprocess.Popen([sys.executable, "-c", LOOP, str(node.shim), str(stop), str(out)])
    try:
        for version in ("2.0", "3.0"):
            report = install(node.bin, node.rt, source_runtime=image_runtime, version=version)
            assert shim_version(node.shim) == version and report.changed
    finally:
        stop.touch()
        loop.wait()
    result = json.loads(out.read_text())
    assert result["runs"] > 0 and result["failures"] == []
    # The new version and the one the old shim named stay; 1.0 is pruned.
    assert versions(node.rt) == {"2.0", "3.0"}
    assert "pruned" in " ".join(report.actions)


def test_rollback_reuses_the_kept_runtime(node, image_runtime):
    for version in ("1.0", "2.0"):
        install(node.bin, node.rt, source_runtime=image_runtime, version=version)
    marker = (node.rt / "1.0" / MARKER).stat().st_ino
    report = install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    assert shim_version(node.shim) == "1.0"
    assert (node.rt / "1.0" / MARKER).stat().st_ino == marker      # not copied again
    assert not any(a.startswith("runtime") for a in report.actions)
    assert versions(node.rt) == {"1.0", "2.0"}
    assert_version_reply(run_shim(node.shim))


def test_keep_one_prunes_everything_else(node, image_runtime):
    install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    install(node.bin, node.rt, source_runtime=image_runtime, version="2.0", keep=1)
    assert versions(node.rt) == {"2.0"}


def test_corrupted_version_dir_is_replaced(node, image_runtime):
    install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    (node.rt / "1.0/bin/python3").unlink()
    report = install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    assert report.changed and versions(node.rt) == {"1.0"}
    assert_version_reply(run_shim(node.shim))


# ------------------------------------------------------------------ busy files, interruption

def test_busy_shim_is_replaced_without_disturbing_its_process(node, image_runtime):
    shutil.copy2("/bin/sleep", node.shim)
    sleeper = subprocess.Popen([str(node.shim), "60"])
    try:
        wait_until(lambda: os.path.realpath(f"/proc/{sleeper.pid}/exe") == str(node.shim),
                   what="the sleeper to execute the shim")
        with pytest.raises(OSError) as busy:
            open(node.shim, "r+b")
        assert busy.value.errno == errno.ETXTBSY
        install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
        assert sleeper.poll() is None                       # the running binary is untouched
        assert_version_reply(run_shim(node.shim))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_replace_retries_on_etxtbsy(node, image_runtime, monkeypatch):
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) < 3:
            raise OSError(errno.ETXTBSY, "Text file busy")
        real(src, dst)

    monkeypatch.setattr(_install.os, "replace", flaky)
    monkeypatch.setattr(_install.time, "sleep", lambda s: None)
    install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    assert len(calls) == 3 and shim_version(node.shim) == "1.0"
    assert [p.name for p in node.bin.iterdir()] == ["route-tune"]   # no temp left behind


def test_replace_gives_up_cleanly(node, image_runtime, monkeypatch, capsys):
    def busy(src, dst):
        raise OSError(errno.ETXTBSY, "Text file busy")

    monkeypatch.setattr(_install.os, "replace", busy)
    monkeypatch.setattr(_install.time, "sleep", lambda s: None)
    rc = main(["--cni-bin-dir", str(node.bin), "--runtime-dir", str(node.rt),
               "--source-runtime", str(image_runtime), "--runtime-version", "1.0"])
    assert rc == 1 and "Text file busy" in capsys.readouterr().err
    assert list(node.bin.iterdir()) == []


KILLED = textwrap.dedent("""
    import os, shutil, sys, time
    from cniplugin.cli import install as _install
    copied, real = [0], shutil.copy2
    def slow_copy(src, dst):
        copied[0] += 1
        if copied[0] == 50:
            open(sys.argv[4], "w").close()      # tell the test we are mid-copy
            time.sleep(600)
        return real(src, dst)
    _install.shutil.copy2 = slow_copy
    _install.install(sys.argv[1], sys.argv[2], source_runtime=sys.argv[3], version="2.0")
""")


def test_killed_install_leaves_node_as_it_was_and_is_cleaned(node, image_runtime, tmp_path):
    install(node.bin, node.rt, source_runtime=image_runtime, version="1.0")
    shim_before = node.shim.read_bytes()
    flag = tmp_path / "midcopy"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(node.bin), str(node.rt),
                             str(image_runtime), str(flag)])
    try:
        def mid_copy() -> bool:
            assert proc.poll() is None, "install finished before it could be killed"
            return flag.exists()
        wait_until(mid_copy, what="the install to reach the middle of its copy")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in node.rt.iterdir() if ".tmp-" in p.name] == [f"2.0.tmp-{proc.pid}"]
    assert not (node.rt / "2.0").exists()
    assert node.shim.read_bytes() == shim_before
    assert_version_reply(run_shim(node.shim))

    (node.bin / ".route-tune.tmp-999999").write_text("half a shim")   # died while flipping
    report = install(node.bin, node.rt, source_runtime=image_runtime, version="2.0")
    assert sum("removed stale" in a for a in report.actions) == 2
    assert versions(node.rt) == {"1.0", "2.0"}
    assert [p.name for p in node.bin.iterdir()] == ["route-tune"]
    assert shim_version(node.shim) == "2.0"


# ------------------------------------------------------------------ defaults file

def test_defaults_installed_when_absent_never_overwritten(node, image_runtime):
    src = node.root / "image-defaults.json"
    src.write_text('{"hostRuleTable": 500}\n')
    kw = dict(source_runtime=image_runtime, version="1.0", defaults_file=src,
              defaults_dest=node.defaults)
    install(node.bin, node.rt, **kw)
    assert node.defaults.read_text() == src.read_text()
    assert node.defaults.stat().st_mode & 0o777 == 0o644

    node.defaults.write_text('{"hostRuleTable": 600}\n')           # the operator's edit
    report = install(node.bin, node.rt, **kw)
    assert node.defaults.read_text() == '{"hostRuleTable": 600}\n' and not report.changed

    report = install(node.bin, node.rt, overwrite_defaults=True, **kw)
    assert node.defaults.read_text() == src.read_text() and report.changed


def test_invalid_defaults_refused_before_any_change(node, image_runtime):
    src = node.root / "bad.json"
    src.write_text("[1, 2]")
    with pytest.raises(InstallError, match="JSON object"):
        install(node.bin, node.rt, source_runtime=image_runtime, version="1.0",
                defaults_file=src, defaults_dest=node.defaults)
    assert not node.rt.exists() and list(node.bin.iterdir()) == []


# ------------------------------------------------------------------ refusals

def test_symlinked_or_missing_dirs_are_refused(node, image_runtime, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    for bin_dir, rt_dir in [(link, node.rt), (node.bin, link), (tmp_path / "nope", node.rt)]:
        with pytest.raises(InstallError):
            install(bin_dir, rt_dir, source_runtime=image_runtime, version="1.0")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("label", ["../x", "a/b", "", "1.0.tmp-3", ".hidden"])
def test_unsafe_version_labels_are_refused(node, image_runtime, label):
    with pytest.raises(InstallError, match="version"):
        install(node.bin, node.rt, source_runtime=image_runtime, version=label or "-")


def fake_tree(root: Path, python: str) -> Path:
    pkg = root / "lib/python3.11/site-packages/cniplugin"
    pkg.mkdir(parents=True)
    (pkg / "_version.py").write_text('__version__ = "9.9"\n')
    (root / "bin").mkdir()
    (root / "bin/python3").write_text(python)
    (root / "bin/python3").chmod(0o755)
    return root


def test_source_symlink_leaving_the_tree_is_refused(node, tmp_path):
    tree = fake_tree(tmp_path / "tree", "#!/bin/sh\n")
    (tree / "lib/escape").symlink_to("/etc")
    with pytest.raises(InstallError, match="leaves the tree"):
        install(node.bin, node.rt, source_runtime=tree)


def test_runtime_that_does_not_start_is_never_published(node, tmp_path):
    tree = fake_tree(tmp_path / "tree", "#!/bin/sh\necho broken >&2\nexit 3\n")
    with pytest.raises(InstallError, match="does not start"):
        install(node.bin, node.rt, source_runtime=tree)
    assert list(node.rt.iterdir()) == [] and list(node.bin.iterdir()) == []


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--host-runtime-dir" in capsys.readouterr().out
