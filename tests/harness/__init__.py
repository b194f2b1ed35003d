"""The one test harness (explicit imports; fixtures registered by ``tests/conftest.py``).

- ``lab``: lab names and clean-up (``NAMES``, ``lab_session``), the variants on
  ``cniplugin.lab.topology.OverlayLab``: overlay and dual stack (``OverlayLab`` itself),
  ``UnderlayLab`` and ``Farm`` (many pods); ``delete_pod_netns``.
- ``snapshot``: the whole-state snapshot (pod + node rules, routes, links, addresses, neighbours,
  sysctls, nft ruleset, state files) and its readable diff.
- ``resident``: the resident-server starter (``cni-route-tune serve``).
- ``plugin``: ``Reply``, ``assert_cni_error`` and ``Rig`` (a lab + one engine mode).
- ``routing``: behaviour assertions of the end-to-end suites (``assert_rail_routing``).
- ``kernel``: the kernel suites' helpers (``sh``, ``nsx``, ``ok``, ``route_get``, ``pings``) and
  ``NetnsGroup``, the namespace bookkeeping and plugin runner of their small topologies.
- ``fixtures``: ``engine`` (in-process vs resident), ``overlay_lab``, ``plugin_env``, ``libcni``,
  ``rail_pod``, ``make_rig``, ``netns_group``, ``make_netns``.
- ``plans``: planner tests' real ``PluginConfig``, the planner with the mode the engine resolves, and golden plans.
"""
