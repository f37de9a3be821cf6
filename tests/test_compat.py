"""Canaries for faceage.compat (and the Ray behaviour testkit.ray_head.RayHead relies on).

Each fails when the private API a compat function uses changes upstream (Ray 2.60,
streamlit-webrtc 0.79): renamed, gone, a different signature or value. None starts Ray. When one
fails, look for a public replacement first, then adapt faceage/compat.py.
"""

from __future__ import annotations

import inspect

import pytest

from faceage import compat


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# -- ray.init -------------------------------------------------------------------------------------


def test_ray_init_takes_the_underscored_temp_dir_and_metrics_port():
    from ray._private import worker

    source = inspect.getsource(worker.init)
    assert 'kwargs.pop("_temp_dir"' in source
    assert 'kwargs.pop("_metrics_export_port"' in source
    assert compat.ray_init_private_kwargs(temp_dir="/tmp/x", metrics_export_port=9) == {
        "_temp_dir": "/tmp/x", "_metrics_export_port": 9}
    assert compat.ray_init_private_kwargs() == {}


# -- Ray Serve ------------------------------------------------------------------------------------


def test_serve_connect_and_the_client_methods_we_call():
    from ray import serve
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient

    assert params(context._connect) == ["raise_if_no_controller_running"]
    deploy = inspect.signature(ServeControllerClient.deploy_apps).parameters
    assert list(deploy)[:3] == ["self", "config", "_blocking"]
    assert isinstance(inspect.getattr_static(ServeControllerClient, "http_config"), property)
    assert params(ServeControllerClient.get_serve_details) == ["self"]
    # faceage.serving.local starts Serve through the public serve.start with these options.
    assert {"http_options", "proxy_location", "controller_options"} <= set(params(serve.start))


def test_serve_controller_actor_name_and_namespace():
    from ray.serve._private import constants

    assert constants.SERVE_CONTROLLER_NAME == "SERVE_CONTROLLER_ACTOR"
    assert constants.SERVE_NAMESPACE == "serve"


# -- Ray core state -------------------------------------------------------------------------------


def test_placement_group_table_accessor_and_fields():
    from ray._private.state import GlobalState, state
    from ray.core.generated import gcs_pb2

    assert isinstance(state, GlobalState)
    assert callable(state._connect_and_get_accessor)
    from ray._raylet import GlobalStateAccessor

    assert callable(GlobalStateAccessor.get_placement_group_table)
    fields = gcs_pb2.PlacementGroupTableData.DESCRIPTOR.fields_by_name
    for name in ("placement_group_id", "state", "is_detached", "creator_actor_id",
                 "creator_actor_dead", "creator_job_id"):
        assert name in fields, name
    table = gcs_pb2.PlacementGroupTableData
    assert {table.CREATED, table.PENDING, table.RESCHEDULING} <= set(
        table.PlacementGroupState.values())


def test_orphaned_placement_groups_reads_states_creators_and_ids_we_rely_on():
    """What ``compat.orphaned_placement_groups`` takes from ``gcs_pb2`` and Ray's ids."""
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    source = inspect.getsource(compat.orphaned_placement_groups)
    assert "gcs_pb2" in source and "placement_group_table()" in source
    table = gcs_pb2.PlacementGroupTableData
    states = table.PlacementGroupState
    assert {states.Name(table.CREATED), states.Name(table.PENDING),
            states.Name(table.RESCHEDULING)} == {"CREATED", "PENDING", "RESCHEDULING"}
    # The other states hold no resources: removing, removed.
    assert set(states.keys()) == {"PENDING", "PREPARED", "CREATED", "REMOVED", "RESCHEDULING"}
    # A driver's placement groups carry the nil actor id as their creator: all 0xff bytes.
    nil = ray.ActorID.nil().binary()
    assert nil and nil.strip(b"\xff") == b""
    assert params(PlacementGroup.__init__)[:2] == ["self", "id"]
    pg_id = ray.PlacementGroupID.from_random()
    assert PlacementGroup(ray.PlacementGroupID(pg_id.binary())).id == pg_id


# -- the cluster launcher -------------------------------------------------------------------------


def test_ray_up_config_checks():
    from ray.autoscaler._private import util

    assert params(util.prepare_config) == ["config"]
    assert params(util.validate_config)[0] == "config"


# -- `ray start`, as testkit.ray_head.RayHead runs it ---------------------------------------------


def test_ray_start_takes_port_zero_and_prints_the_addresses_we_read():
    from ray._private import node
    from ray.scripts import scripts

    options = {p.name: p for p in scripts.start.params}
    for name in ("head", "block", "port", "include_dashboard", "dashboard_host", "dashboard_port",
                 "dashboard_agent_listen_port", "ray_client_server_port", "min_worker_port",
                 "max_worker_port", "temp_dir", "node_ip_address", "disable_usage_stats"):
        assert name in options, f"ray start has no --{name.replace('_', '-')}"
    assert "if port is set to 0, we will allocate an available port" in options["port"].help
    # The agents' ports left unset become 0: each binds its own and records it for the raylet.
    init = inspect.getsource(node.Node.__init__)
    for port in ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port",
                 "runtime_env_agent_port"):
        assert f"{port}=ray_params.{port} or 0" in init, port
    # RayHead reads the GCS address and the dashboard URL from these lines of `ray start`.
    source = inspect.getsource(scripts.start.callback)
    assert "ray start --address='{}'" in source
    assert "RAY_API_SERVER_ADDRESS='http://{}' ray job submit" in source
    assert 'startup_msg = "Ray runtime started."' in source


def test_ray_start_and_dashboard_bind_port_zero_themselves():
    from ray.dashboard import http_server_head

    # The dashboard binds what it is given (0 included) and reports the port it got.
    source = inspect.getsource(http_server_head.HttpServerDashboardHead.run)
    assert "site._server.sockets[0].getsockname()" in source


# -- streamlit-webrtc -----------------------------------------------------------------------------


def test_train_report_line_is_logged_by_a_logger_named_after_its_file():
    from ray.train.v2._internal.execution import context

    source = inspect.getsource(context)
    assert "logger = logging.getLogger(__file__)" in source
    assert "Reporting training result" in source
    compat.quiet_train_report_log("WARNING")
    import logging

    assert not context.logger.isEnabledFor(logging.INFO)


def test_webrtc_context_records_its_last_rendered_run_count():
    from streamlit_webrtc import component

    cls = getattr(component, compat.WEBRTC_CONTEXT_CLASS)
    assert compat.WEBRTC_RUN_COUNT_ATTR in cls.__annotations__
    # The orphan check faceage/webapp/webrtc_guard.py disarms still reads it.
    assert compat.WEBRTC_RUN_COUNT_ATTR in inspect.getsource(component._get_or_create_context)
    context = cls(worker=None, state=component.WebRtcStreamerState(playing=False,
                                                                   signalling=False))
    assert compat.is_webrtc_context(context)
    assert compat.webrtc_rendered_run_count(context) is None
    setattr(context, compat.WEBRTC_RUN_COUNT_ATTR, 3)
    assert compat.webrtc_rendered_run_count(context) == 3
    compat.forget_webrtc_rendered_run_count(context)
    assert compat.webrtc_rendered_run_count(context) is None
    assert not compat.is_webrtc_context(object())


@pytest.mark.parametrize("module", ["faceage.compat", "faceage.runtime"])
def test_importing_does_not_import_ray(module):
    """The Streamlit app imports faceage.compat; it must stay free of Ray (and torch)."""
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
