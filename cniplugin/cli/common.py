"""Plumbing every ``cni-route-tune`` subcommand shares, written once: exit codes, the parser
factory and its option table, the error-to-exit-code mapping, node defaults, input files.

Stdlib only at import time: ``<subcommand> --help`` must stay as cheap as an interpreter start.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_CODES = """exit codes (read commands):
  0  ok: nothing wrong found
  1  a problem was found: drift, a routing problem, a failed probe, the walk and the kernel
     disagree, orphans present (or the command failed on this host, e.g. not root)
  2  usage error: bad options, or an input file that is missing, unreadable or invalid
  3  the network namespace (or pod) does not exist"""


class UsageError(Exception):
    """Bad options or input files (exit 2)."""


# -- options: name -> adder; a subcommand lists the names it takes, in help order ----------
def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _node_netns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-netns", metavar="PATH",
                   help="the node's netns (default: the netns this command runs in)")


def _state_dir_option(p: argparse.ArgumentParser) -> None:
    from cniplugin.records.defaults import STATE_DIR
    p.add_argument("--state-dir", metavar="DIR",
                   help="route-tune state dir (default: stateDir of the node defaults file "
                        "$ROUTE_TUNE_DEFAULTS or /etc/cni/route-tune/defaults.json, else "
                        f"{STATE_DIR})")


def _netns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", required=True, metavar="NAME|PATH")


def _pod_default_nic_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pod-default-nic", metavar="IF")


OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "json": _json, "node-netns": _node_netns, "state-dir": _state_dir_option,
    "netns": _netns, "pod-default-nic": _pod_default_nic_option,
}


def subcommand(name: str, description: str, run: Callable[[argparse.Namespace], int],
               *options: str | Callable[[argparse.ArgumentParser], None]):
    """A subcommand's ``main(argv) -> int``: its parser (``options`` are names in ``OPTIONS``
    or adders of the subcommand's own), then ``run`` with failures mapped to exit codes."""
    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"cni-route-tune {name}", description=description,
                                         epilog=EXIT_CODES,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for option in options:
            (OPTIONS[option] if isinstance(option, str) else option)(parser)
        return parser

    def main(argv: list[str]) -> int:
        return _guarded(name, run, build().parse_args(argv))

    main.__doc__ = f"``cni-route-tune {name}``: {description}"
    return main


def _guarded(name: str, run, args: argparse.Namespace) -> int:
    """Run, and map failures to the documented exit codes."""
    try:
        return run(args)
    except UsageError as err:
        code, text = EXIT_USAGE, str(err)
    except PermissionError as err:
        code, text = EXIT_PROBLEM, f"{err} (this command needs root)"
    except Exception as err:
        from cniplugin.protocol.errors import CNIError
        live = sys.modules.get("cniplugin.cli.live")  # only it raises NotFound
        if live is not None and isinstance(err, live.NotFound):
            code, text = EXIT_NOT_FOUND, str(err)
        elif isinstance(err, CNIError):
            code, text = EXIT_PROBLEM, err.msg + (f" ({err.details})" if err.details else "")
        else:
            raise
    sys.stdout.flush()
    sys.stderr.write(f"cni-route-tune {name}: {text}\n")
    return code


# -- node defaults and namespaces ----------------------------------------------------------
def node_defaults(environ=None):
    from cniplugin.protocol.env import read_node_defaults
    try:
        return read_node_defaults(os.environ if environ is None else environ)
    except Exception as err:  # a broken defaults file must not hide the pod from the operator
        raise UsageError(str(getattr(err, "msg", err))) from None


def state_dir(args) -> str:
    from cniplugin.records.defaults import node_state_dir
    return args.state_dir or node_state_dir(node_defaults().values)


def host_rule_table() -> int:
    from cniplugin.records.defaults import HOST_RULE_TABLE
    return int(node_defaults().values.get("hostRuleTable") or HOST_RULE_TABLE)


def pod_default_nic(args) -> str:
    return args.pod_default_nic or node_defaults().values.get("podDefaultCniNic") or "eth0"


def open_node(args):
    """The node netns fd (None: this process's netns)."""
    from cniplugin.cli.live import open_netns
    return open_netns(args.node_netns) if getattr(args, "node_netns", None) else None


def close(*fds) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


# -- output and input files ----------------------------------------------------------------
def emit(args, data: dict, text: str) -> None:
    from cniplugin.cli.render import dump_json
    print(dump_json(data) if args.json else text)


def read_json(path: str, what: str):
    import json
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as err:
        raise UsageError(f"{what} {path}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"{what} {path} is not valid JSON: {err}") from None


def read_env_file(path: str) -> dict[str, str]:
    """``K=V`` lines (``#`` comments, ``export``, quotes), a NUL-separated ``/proc/<pid>/environ``
    dump, or a JSON object."""
    import json
    import shlex
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"env file {path}: {err.strerror}") from None
    text = data.decode(errors="replace")
    if text.lstrip().startswith("{"):
        try:
            return {str(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as err:
            raise UsageError(f"env file {path} is not a valid JSON object: {err}") from None
    lines = text.split("\0") if "\0" in text else text.splitlines()
    env = {}
    for number, line in enumerate(lines, 1):
        line = line.strip() if "\0" not in text else line
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UsageError(f"env file {path}:{number}: expected KEY=VALUE, got {line!r}")
        if value[:1] in "'\"" and "\0" not in text:
            try:
                value = shlex.split(value)[0] if value.strip("'\"") else ""
            except ValueError:
                pass
        env[key.strip()] = value
    return env
