"""Built-in defaults and spellings shared by the protocol layer, the engine and the CLI.

Imports nothing on purpose: the light DEL path (netns gone) and the CLI's option help read these
without importing pydantic, pyroute2 or even ``socket``. Every other module takes them from here.
"""

from __future__ import annotations

STATE_DIR = "/run/route-tune"
SOCKET_PATH = STATE_DIR + "/engine.sock"
HOST_RULE_TABLE = 500
HOST_RULE_PRIORITY = 1000
# The reserved tables (never a hostRuleTable, never a pod table) are kernel vocabulary:
# records/objects.py's RESERVED_TABLES.


def node_state_dir(values) -> str:
    """The node's state dir from the node defaults' values: ``stateDir`` when it is a non-empty
    string (a node-only key), else the built-in one."""
    configured = values.get("stateDir")
    return configured if isinstance(configured, str) and configured else STATE_DIR


def normalise_mode(value):
    """``disable`` is accepted for ``disabled`` (coordinator spells it both ways)."""
    return "disabled" if value == "disable" else value

