"""Every use of a private Ray (or streamlit-webrtc) API, in one place.

Each function names the version it was written against, what it relies on upstream and why no
public API does; tests/test_compat.py holds a canary per use that fails when upstream changes.
When a canary fails: look for a public replacement first, then adapt the function here.

Imports stay inside the functions: the Streamlit app imports this module and must not import
Ray (or torch) with it.
"""

from __future__ import annotations

from typing import Any

# -- ray.init -------------------------------------------------------------------------------------


def ray_init_private_kwargs(*, temp_dir: str | None = None,
                            metrics_export_port: int | None = None) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a session folder and a Prometheus metrics port.

    Ray 2.60: ``ray.init`` takes these only as the underscored ``_temp_dir`` and
    ``_metrics_export_port`` (ray/_private/worker.py ``init``, "private" kwargs popped from
    ``**kwargs``); ``ray start`` has them as public ``--temp-dir`` / ``--metrics-export-port``.
    A private instance needs its own short temp dir (Unix socket paths < 108 bytes) and a known
    metrics port to report.
    """
    kwargs: dict[str, Any] = {}
    if temp_dir is not None:
        kwargs["_temp_dir"] = temp_dir
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    return kwargs


# -- Ray Serve ------------------------------------------------------------------------------------


def serve_client():
    """The ``ServeControllerClient`` of the Serve running on the connected cluster.

    Ray 2.60: ``ray.serve.context._connect`` (what ``serve.run``/``serve.status`` use inside).
    ``serve.start`` returns nothing, and only the client has ``http_config`` (the options of a
    Serve already running, which keeps its own), ``deploy_apps`` (a whole config, as
    ``serve deploy`` sends it) and ``get_serve_details``; the public route to these is the
    dashboard's REST API, which needs the dashboard and its token.
    """
    from ray.serve import context

    return context._connect()


def deploy_config_nonblocking(client, schema) -> None:
    """Hand a whole ``ServeDeploySchema`` to the controller and return at once, as ``serve run
    CONFIG`` does (ray/serve/scripts.py ``run``); the caller then waits on ``/healthz`` itself.

    Ray 2.60: ``ServeControllerClient.deploy_apps(config, _blocking=False)``
    (ray/serve/_private/client.py). Public ``serve.run`` takes an application object built in
    this process, not a config whose per-deployment settings the controller applies.
    """
    client.deploy_apps(schema, _blocking=False)


def serve_details(client) -> dict:
    """``ServeInstanceDetails`` fields (as a dict) of the cluster's Serve: its applications and
    their deployed configs. Ray 2.60: ``ServeControllerClient.get_serve_details`` (public name on
    the private client; ray/serve/_private/client.py)."""
    return client.get_serve_details()


def serve_controller_running() -> bool:
    """True when the connected cluster already runs a Serve controller.

    Ray 2.60: the controller is the actor ``SERVE_CONTROLLER_NAME`` ("SERVE_CONTROLLER_ACTOR")
    in namespace ``SERVE_NAMESPACE`` ("serve"), both in ray/serve/_private/constants.py. Public
    ``serve.status()`` starts nothing but *connects* through ``_connect``, which raises a
    generic RayServeException when no controller runs; the named-actor lookup says so exactly.
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


# -- Ray core state -------------------------------------------------------------------------------


def placement_group_table() -> list[Any]:
    """Every placement group of the connected cluster as ``gcs_pb2.PlacementGroupTableData``.

    Ray 2.60: ``ray._private.state.state._connect_and_get_accessor().get_placement_group_table()``
    is what ``ray.util.placement_group_table`` reads, but the public function drops the
    creator fields (``creator_actor_id``, ``creator_actor_dead``, ``creator_job_id``,
    ``is_detached``) that tell an orphaned Train worker group from a live one; the state API
    (``ray.util.state``) has them but fails on a machine with several Ray instances ("Found
    multiple active Ray instances"). ``orphaned_placement_groups`` reads them.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    return [gcs_pb2.PlacementGroupTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_placement_group_table()]


def orphaned_placement_groups() -> list[Any]:
    """This job's placement groups whose creating actor died (not detached ones), as
    ``ray.util.placement_group.PlacementGroup`` handles to remove.

    A Tune trial's Train controller creates its workers' placement group; when ASHA stops the
    trial, the controller dies and the group lives on until the job ends. Ray Train's own cleaner
    removes it, but it finds the cluster through the state API, which fails on a machine with
    several Ray instances ("Found multiple active Ray instances"). Ray has no public API for a
    placement group's creator, so this reads ``placement_group_table``.

    Ray 2.60: ``gcs_pb2.PlacementGroupTableData``'s ``state`` enum (CREATED, PENDING and
    RESCHEDULING hold or wait for resources; src/ray/protobuf/gcs.proto), and a driver's groups
    (Tune's own, one per trial) carry the nil actor id (all 0xff bytes, ``ActorID.nil()``) as
    their creator and count as "actor dead" from the start.
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    table = gcs_pb2.PlacementGroupTableData
    live = (table.CREATED, table.PENDING, table.RESCHEDULING)
    found = []
    for pg in placement_group_table():
        by_actor = pg.creator_actor_id.strip(b"\xff") != b""
        if (pg.state in live and not pg.is_detached and by_actor and pg.creator_actor_dead
                and pg.creator_job_id.hex() == job):
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


# -- Ray Train's logs -----------------------------------------------------------------------------


def quiet_train_report_log(level: str) -> None:
    """Hold Ray Train's per-report INFO line (``Reporting training result N: TrainingReport(...)``,
    a few hundred characters per epoch in the run's output) to ``level``.

    Ray 2.60: ray/train/v2/_internal/execution/context.py logs it through
    ``logging.getLogger(__file__)``, a logger named by the file's *path*, outside the ``ray.train``
    hierarchy that ``LoggingConfig`` and ``train.ray_log_level`` set; so its name is taken from
    that module's ``__file__``.
    """
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


# -- the cluster launcher -------------------------------------------------------------------------


def check_launcher_config(config: dict) -> dict:
    """``config`` (a ``ray up`` YAML, parsed) as ``ray up`` prepares it, validated; the prepared
    config is returned. Ray 2.60: ``ray.autoscaler._private.util.prepare_config`` and
    ``validate_config``, what ``ray up`` runs (ray/autoscaler/_private/commands.py
    ``create_or_update_cluster``); there is no public dry run that needs no cloud credentials.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


# -- streamlit-webrtc -----------------------------------------------------------------------------

# streamlit-webrtc 0.79: ``WebRtcStreamerContext._last_rendered_run_count`` (component.py),
# read by ``_get_or_create_context``'s orphan check (upstream PR #2478).
# faceage/webapp/webrtc_guard.py explains the race it causes and why clearing it is safe in our app.
WEBRTC_CONTEXT_CLASS = "WebRtcStreamerContext"
WEBRTC_RUN_COUNT_ATTR = "_last_rendered_run_count"


def is_webrtc_context(obj: Any) -> bool:
    """True for a streamlit-webrtc context that records its last rendered run count."""
    return type(obj).__name__ == WEBRTC_CONTEXT_CLASS and hasattr(obj, WEBRTC_RUN_COUNT_ATTR)


def webrtc_rendered_run_count(context: Any) -> int | None:
    """The script run count at which ``context``'s component last rendered (None: not yet)."""
    return getattr(context, WEBRTC_RUN_COUNT_ATTR)


def forget_webrtc_rendered_run_count(context: Any) -> None:
    """Clear it: the library's orphan check is skipped for this run and records it again."""
    setattr(context, WEBRTC_RUN_COUNT_ATTR, None)
