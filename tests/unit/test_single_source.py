"""Values that must be spelled twice for a measured reason stay equal."""

from cniplugin.engine import defaults
from cniplugin.transport import shim


def test_shim_socket_is_the_engine_default():
    # The shim does not import engine.defaults (start-up cost on every CNI call).
    assert shim.DEFAULT_SOCKET == defaults.SOCKET_PATH
