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
  sysctls, nft ruleset, state files), its readable diff, and views of one namespace's state
  (``without_dev``/``only_dev``, ``without_addrs``, ``rules_sorted``).
- ``resident``: the resident-server starter (``cni-route-tune serve``), the plugin's log
  (``plugin_log``, ``served_count``).
- ``plugin``: ``Reply``, ``assert_ok``, ``assert_cni_error`` and ``Rig`` (a lab + one engine
  mode); ``request_env`` and ``PREV``: a request that needs no namespace.
- ``cli``: the operator CLI runner (``cli``) and ``CliPod``.
- ``golden``: whole-text golden files (``UPDATE_GOLDEN=1``), the live-output normaliser and
  ``mask_rtt``.
- ``routing``: behaviour assertions of the end-to-end suites (``assert_rail_routing``).
- ``kernel``: the kernel suites' helpers (``sh``, ``nsx``, ``ok``, ``route_get``, ``pings``) and
  who answers ARP / neighbour solicitations on a segment (``listen_answers``, ``arp_answers``).
- ``fixtures``: ``engine`` (in-process vs resident), ``overlay_lab``, ``plugin_env``, ``libcni``,
  ``rail_pod``, ``make_rig``, ``netns_group``, ``make_netns``, ``cni_env``, ``calico_rails``,
  ``underlay_factory``, ``fabric``.
- ``fabric``: the two-node fabric suites' module-scoped ``fabric_rig`` (a ``cniplugin.lab.fabric``
  lab with its pods through libcni, per mode/layout/family), their snapshots and every rail's
  own stream (``FabricRig.assert_streams_on_own_rails``).
- ``plans``: planner tests' real ``PluginConfig``, the planner with the mode the engine resolves, and golden plans.
"""
