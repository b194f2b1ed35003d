"""Values that must be spelled twice for a measured reason stay equal."""

from cniplugin.records import defaults
from cniplugin.transport import shim


def test_shim_socket_is_the_engine_default():
    # The shim does not import records.defaults (start-up cost on every CNI call).
    assert shim.DEFAULT_SOCKET == defaults.SOCKET_PATH
