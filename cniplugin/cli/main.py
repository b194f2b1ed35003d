"""``cni-route-tune``: the operator's CLI (``--version``, ``--help`` and a table of subcommands).

Adding a subcommand = one ``main(argv) -> int`` (``cli.common.subcommand`` builds it from a
description, a run function and option names) + one ``SUBCOMMANDS`` entry here. The target is
imported (and its heavy imports made) only when that subcommand runs, so ``--version`` and
``--help`` stay as cheap as an interpreter start. Families: ``cli.read`` (show, facts, orphans),
``cli.plan`` (plan, verify), ``cli.packet`` (explain, probe, reach), ``cli.replay``. Facts, plans and
checks are the engine's own (``engine.gather``, ``engine.commands.plan_for``, ``engine.compare.diff_state``),
never a second implementation; ``cli.live`` reads the kernel and ``cli.render`` prints.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Re-exported: the exit codes and the input-file helpers are part of this module's interface.
from cniplugin.cli.common import (EXIT_CODES, EXIT_NOT_FOUND, EXIT_OK, EXIT_PROBLEM,  # noqa: F401
                                  EXIT_USAGE, UsageError, read_env_file)

__all__ = ["main", "SUBCOMMANDS", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "EXIT_NOT_FOUND",
           "UsageError", "read_env_file"]

#: name -> ("module:function", one-line help). The function takes argv (list[str]) and
#: returns an exit status.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cniplugin.lab.demo:main",
             "build a throwaway multi-NIC pod in network namespaces and run the plugin chain"),
    "install": ("cniplugin.cli.install:main",
                "install or upgrade the plugin into a CNI bin dir (atomic, idempotent)"),
    "serve": ("cniplugin.transport.service:main", "run the resident engine (unix socket)"),
    "show": ("cniplugin.cli.read:cmd_show",
             "a pod's policy routing per interface: owned/foreign, problems (--node: node side)"),
    "facts": ("cniplugin.cli.read:cmd_facts", "dump the planner's facts of a pod as JSON (for plan)"),
    "plan": ("cniplugin.cli.plan:cmd_plan",
             "what ADD would install, as ip commands (no root, no namespace entered)"),
    "verify": ("cniplugin.cli.plan:cmd_verify", "CHECK an attachment against the kernel, as a diff"),
    "explain": ("cniplugin.cli.packet:cmd_explain",
                "which rule, table, route and interface a packet takes, checked by the kernel"),
    "replay": ("cniplugin.cli.replay:cmd_replay",
               "run a captured request (env + stdin) as a runtime would"),
    "probe": ("cniplugin.cli.packet:cmd_probe", "the gateway and IP-conflict checks, by hand"),
    "reach": ("cniplugin.cli.packet:cmd_reach",
              "per rail, the kernel's path to a peer and whether the peer answers over it"),
    "orphans": ("cniplugin.cli.read:cmd_orphans",
                "route-tune node entries and state files nobody owns any more (--remove)"),
}


def _parser() -> argparse.ArgumentParser:
    from cniplugin._version import PLUGIN_NAME, SUPPORTED_VERSIONS, __version__
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in sorted(SUBCOMMANDS.items()))
    parser = argparse.ArgumentParser(
        prog="cni-route-tune",
        description="Inspect, explain and exercise route-tune, the policy-routing CNI plugin.",
        epilog=f"subcommands:\n{listing}\n\n{EXIT_CODES}\n\n"
               f"'cni-route-tune <subcommand> --help' shows its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--version", action="version",
        version=f"{PLUGIN_NAME} {__version__} (CNI {', '.join(SUPPORTED_VERSIONS)})")
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="subcommand",
                        help="one of: " + ", ".join(sorted(SUBCOMMANDS)))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _load(target: str):
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cni-route-tune``; returns (and exits with) the subcommand's status."""
    options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    target, _ = SUBCOMMANDS[options.subcommand]
    try:
        function = _load(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            sys.stderr.write(f"cni-route-tune: subcommand {options.subcommand!r} is not "
                             f"available in this build ({exc.name} is missing)\n")
            return 2
        raise
    try:
        status = function(options.args)
    except BrokenPipeError:  # `cni-route-tune show ... | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEM
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
