"""The one test harness, reached only by explicit ``harness.<module>`` imports (``pythonpath``
in pyproject.toml); ``tests/conftest.py`` only registers its fixtures and options.

- ``host``: paths of the installed executables, the root/CI rule (``require``,
  ``require_root``), the one plugin runner (``run_plugin``), ``in_netns``, ``wait_until``.
- ``lab``: lab names and clean-up (``NAMES``, ``lab_session``), ``scratch_netns``, the variants
  on ``cniplugin.lab.topology.OverlayLab``: ``UnderlayLab`` and ``Farm`` (many pods);
  ``delete_pod_netns``.
- ``topologies``: the kernel suites' small topologies (``NetnsGroup``: ``CalicoRails``,
  ``Underlay``, ``Fabric``).
- ``snapshot``: the whole-state snapshot (pod + node rules, routes, links, addresses, neighbours,
  sysctls, nft ruleset, state files) and its readable diff.
- ``resident``: the resident-server starter (``cni-route-tune serve``).
- ``plugin``: ``Reply``, ``assert_cni_error`` and ``Rig`` (a lab + one engine mode).
- ``cli``: the operator CLI runner (``cli``) and ``CliPod``.
- ``golden``: whole-text golden files (``UPDATE_GOLDEN=1``) and the live-output normaliser.
- ``routing``: behaviour assertions of the end-to-end suites (``assert_rail_routing``).
- ``kernel``: the kernel suites' helpers (``sh``, ``nsx``, ``ok``, ``route_get``, ``pings``).
- ``fixtures``: ``engine`` (in-process vs resident), ``overlay_lab``, ``plugin_env``, ``libcni``,
  ``rail_pod``, ``make_rig``, ``netns_group``, ``make_netns``, ``cni_env``, ``calico_rails``,
  ``underlay_factory``, ``fabric``.
- ``fabric``: the two-node fabric suites' module-scoped ``fabric_rig`` (a ``cniplugin.lab.fabric``
  lab with its pods through libcni, per mode/layout/family), their snapshots and an ARP probe.
- ``plans``: planner tests' real ``PluginConfig``, the planner with the mode the engine resolves, and golden plans.
"""
