"""``cni-route-tune``: the operator's CLI (``--version``, ``--help`` and a table of subcommands).

Adding a subcommand = one ``main(argv) -> int`` function in its own module + one ``SUBCOMMANDS``
entry here. The target module is imported only when that subcommand runs, so ``--version`` and
``--help`` stay as cheap as an interpreter start; each subcommand parses its own arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "SUBCOMMANDS"]

#: name -> ("module:function", one-line help). The function takes argv (list[str]) and
#: returns an exit status.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cniplugin.lab.demo:main",
             "build a throwaway multi-NIC pod in network namespaces and run the plugin chain"),
}


def _parser() -> argparse.ArgumentParser:
    from ._version import PLUGIN_NAME, SUPPORTED_VERSIONS, __version__
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in sorted(SUBCOMMANDS.items()))
    parser = argparse.ArgumentParser(
        prog="cni-route-tune",
        description="Inspect, explain and exercise route-tune, the policy-routing CNI plugin.",
        epilog=f"subcommands:\n{listing}\n\n'cni-route-tune <subcommand> --help' shows its options.",
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
    status = function(options.args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
