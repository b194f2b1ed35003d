"""``replay``: run a captured request (env + stdin) as a runtime would."""

from __future__ import annotations

import os
import sys

from cniplugin.cli.common import (EXIT_OK, EXIT_PROBLEM, UsageError, close, emit, open_node,
                                  read_env_file, subcommand)


def _replay_options(p) -> None:
    p.add_argument("--env", required=True, metavar="FILE",
                   help="K=V lines, /proc/PID/environ dump or JSON object")
    p.add_argument("--stdin", required=True, metavar="FILE", help="the request's stdin bytes")
    p.add_argument("--netns-override", metavar="PATH", help="replace CNI_NETNS")
    p.add_argument("--plugin", metavar="PATH",
                   help="the executable (default: route-tune next to this interpreter, else "
                        "on PATH)")
    p.add_argument("--node-netns", metavar="PATH",
                   help="run the plugin in this netns (the runtime's; default: this one)")


def _find_plugin(explicit: str | None) -> str:
    import shutil
    candidates = [explicit] if explicit else [
        os.path.join(os.path.dirname(sys.executable), "route-tune"), shutil.which("route-tune")]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise UsageError("no route-tune executable found" + (f" at {explicit}" if explicit else ""))


def _replay(args) -> int:
    import shlex
    import subprocess
    env = read_env_file(args.env)
    try:
        with open(args.stdin, "rb") as f:
            stdin = f.read()
    except OSError as err:
        raise UsageError(f"stdin file {args.stdin}: {err.strerror}") from None
    if args.netns_override:
        env["CNI_NETNS"] = args.netns_override
    env.setdefault("PATH", os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    plugin = _find_plugin(args.plugin)
    from cniplugin.kernel import netns as _netns
    node_fd = open_node(args)
    try:
        with _netns.entered(node_fd):  # the child forks from this thread: it starts there too
            proc = subprocess.run([plugin], input=stdin, env=env, capture_output=True,
                                  check=False)
    finally:
        close(node_fd)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    cni = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.startswith("CNI_"))
    data = {"plugin": plugin, "env": env, "exit_code": proc.returncode, "stdout": out,
            "stderr": err}
    text = (f"$ {cni} {plugin} < {args.stdin}\nexit code: {proc.returncode}\n"
            f"--- stdout ---\n{out.rstrip()}\n--- stderr ---\n{err.rstrip()}")
    emit(args, data, text)
    return EXIT_OK if proc.returncode == 0 else EXIT_PROBLEM


cmd_replay = subcommand(
    "replay", "Run a captured request exactly as the runtime would: the installed route-tune "
              "executable, with the env file as its whole environment (PATH added when absent) "
              "and the stdin file on stdin. Prints stdout, stderr and the exit code; exits 0 if "
              "the plugin did, else 1.",
    _replay, _replay_options, "json")
