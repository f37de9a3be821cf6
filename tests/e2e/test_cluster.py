"""cluster/ parses, matches its schemas, and names entry points and config files that exist."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws.yaml"
STORAGE = KUBERAY / "storage.yaml"
SHARED_MOUNT = "/mnt/shared"

# Kubernetes release whose core schemas (kubernetes-validate) check the pod templates.
KUBERNETES_VERSION = "1.31"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def ray_objects() -> list[dict]:
    docs = [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]
    return [d for d in docs if d["kind"] in RAY_KINDS]


def by_kind(kind: str) -> dict:
    (obj,) = [d for d in ray_objects() if d["kind"] == kind]
    return obj


def cluster_spec(obj: dict) -> dict:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    spec = obj["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[obj["kind"]]()


def groups(obj: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head group and every worker group."""
    spec = cluster_spec(obj)
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def locked_version(package: str) -> str:
    lock = (ROOT / "uv.lock").read_text()
    match = re.search(rf'\n\[\[package\]\]\nname = "{package}"\nversion = "([^"]+)"', lock)
    assert match, f"{package} is not in uv.lock"
    return match.group(1)


# -- every file parses -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_to_objects(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_cluster_folder_has_what_the_readme_lists():
    readme = (CLUSTER / "README.md").read_text()
    for path in [LAUNCHER, CLUSTER / "Dockerfile", *sorted(KUBERAY.glob("*.yaml"))]:
        assert path.relative_to(CLUSTER).as_posix() in readme, f"README.md does not list {path}"
    assert {d["kind"] for d in ray_objects()} == set(RAY_KINDS)


# -- the Ray cluster launcher config ---------------------------------------------------------------


def test_launcher_matches_rays_bundled_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load_docs(LAUNCHER)[0], schema)


def test_launcher_passes_the_checks_of_ray_up():
    """`ray up` fills in the provider's defaults, then validates; both must accept the file."""
    from faceage.compat import check_launcher_config

    prepared = check_launcher_config(copy.deepcopy(load_docs(LAUNCHER)[0]))
    node_types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert node_types[head]["resources"] == {"CPU": 0}, "training and Serve belong on GPU nodes"
    workers = {name: t for name, t in node_types.items() if name != head}
    assert workers
    for name, node_type in workers.items():
        family = node_type["node_config"]["InstanceType"].split(".")[0]
        assert re.fullmatch(r"g\d+\w*|p\d+\w*", family), f"{name}: {family} has no NVIDIA GPU"
        assert node_type["max_workers"] <= prepared["max_workers"]


def test_launcher_installs_the_locked_environment_from_this_checkout():
    cfg = load_docs(LAUNCHER)[0]
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local == "."]
    assert (ROOT / cfg["file_mounts"][remote]).resolve() == ROOT, "ray up syncs the repo root"
    assert ".gitignore" in cfg["rsync_filter"], ".venv and runs/ must not be copied"
    setup = "\n".join(cfg["setup_commands"])
    assert "uv sync --frozen" in setup
    project_dir = remote.replace("/home/ubuntu", "~")
    assert f"cd {project_dir} &&" in setup
    assert f"{Path(project_dir).name}/.venv/bin" in setup, "ray and job entrypoints use that env"
    assert SHARED_MOUNT in setup
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "--disable-usage-stats" in cmd


def test_launcher_commands_are_valid_bash():
    cfg = load_docs(LAUNCHER)[0]
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    for cmd in [c for key in keys for c in cfg.get(key, [])]:
        checked = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert checked.returncode == 0, f"{cmd}\n{checked.stderr}"


# -- KubeRay objects against their CRDs ------------------------------------------------------------

# The ray.io/v1 schemas of KubeRay v1.7.0 (../shared/kuberay-crds, descriptions removed), made
# strict: an object schema without x-kubernetes-preserve-unknown-fields rejects unknown fields,
# as the API server does with strict field validation. The CEL rules and name limits the operator
# checks itself are in operator_rule_violations.
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "rayclusters.v1.json", "RayJob": "rayjobs.v1.json",
             "RayService": "rayservices.v1.json"}
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(),
                                reason=f"{CRD_DIR} (KubeRay v1.7.0's CRD schemas) is not here")


def _strict(schema):
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf",
                                   "not") else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if ("additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    """The strict object schema of one ray.io/v1 kind, from the provided CRD."""
    crd = json.loads((CRD_DIR / CRD_FILES[kind]).read_text())
    assert (crd["kind"], crd["group"], crd["version"]) == (kind, "ray.io", "v1")
    schema = _strict(crd["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


def crd_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(crd_schema(obj["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)]


# Name limits of ray-operator/controllers/ray/utils (validation.go, constant.go): a RayCluster name
# is a DNS-1035 label of at most 53 characters; RayJob and RayService names get a 6-character
# suffix for the clusters they create.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def operator_rule_violations(obj: dict) -> list[str]:
    """The KubeRay operator's own checks (validation.go) that the CRD schema cannot express."""
    errors = []
    name = obj["metadata"]["name"]
    if not DNS_1035.fullmatch(name) or len(name) > NAME_LIMITS[obj["kind"]]:
        errors.append(f"name {name!r}: DNS-1035 label of at most {NAME_LIMITS[obj['kind']]}")
    spec = obj["spec"]
    if obj["kind"] == "RayJob":
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errors.append("RayJob needs rayClusterSpec or clusterSelector")
        if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode" and not spec.get(
                "entrypoint"):
            errors.append("RayJob without an entrypoint runs nothing")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("suspend needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
            errors.append("ttlSecondsAfterFinished and backoffLimit must be >= 0")
        if spec.get("submissionMode", "K8sJobMode") not in (
                "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
            errors.append(f"submissionMode {spec['submissionMode']!r} is not one KubeRay knows")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    if obj["kind"] == "RayService":
        head_service = cluster_spec(obj)["headGroupSpec"].get("headService") or {}
        if head_service.get("metadata", {}).get("name"):
            errors.append("a RayService's headService must not set a name")
    autoscaling = cluster_spec(obj).get("enableInTreeAutoscaling", False)
    for group_name, group in groups(obj):
        params = group.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{group_name}: use the group's labels field, not rayStartParams labels")
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            errors.append(f"{group_name}: resources set in both rayStartParams and resources")
        restart = group["template"]["spec"].get("restartPolicy", "Never")
        if autoscaling and restart != "Never":  # autoscaler v2, the default since Ray 2.47
            errors.append(f"{group_name}: restartPolicy must be Never or unset with autoscaling")
        if group_name != "head" and not group["minReplicas"] <= group.get(
                "replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"{group_name}: needs minReplicas <= replicas <= maxReplicas")
    return errors


@needs_crds
@pytest.mark.parametrize("obj", ray_objects(), ids=lambda o: o["kind"])
def test_ray_object_matches_its_crd(obj):
    assert crd_errors(obj) == []
    assert operator_rule_violations(obj) == []


@needs_crds
def test_crd_schema_catches_mistakes():
    """The strict schemas reject what the API server rejects, so a pass means something."""
    cluster = by_kind("RayCluster")
    mistakes = {}
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    mistakes["unknown group field"] = typo
    deep_typo = copy.deepcopy(cluster)
    ray_container(deep_typo["spec"]["headGroupSpec"])["resourcess"] = {}
    mistakes["unknown container field"] = deep_typo
    auth = copy.deepcopy(cluster)
    auth["spec"]["authOptions"]["mode"] = "tokens"
    mistakes["auth mode"] = auth
    old_api = copy.deepcopy(cluster)
    old_api["apiVersion"] = "ray.io/v1alpha1"
    mistakes["apiVersion"] = old_api
    wrong_type = copy.deepcopy(by_kind("RayService"))
    wrong_type["spec"]["serveConfigV2"] = {"applications": []}
    mistakes["serveConfigV2 as a mapping"] = wrong_type
    for what, obj in mistakes.items():
        assert crd_errors(obj), f"{what} passed"
    long_name = copy.deepcopy(by_kind("RayJob"))
    long_name["metadata"]["name"] = "faceage-" + "x" * 40
    assert operator_rule_violations(long_name)
    bad_mode = copy.deepcopy(by_kind("RayJob"))  # a plain string in the CRD; the operator checks
    bad_mode["spec"]["submissionMode"] = "K8sMode"
    assert operator_rule_violations(bad_mode)


def pod_templates() -> list[tuple[str, dict]]:
    found = []
    for obj in ray_objects():
        for group_name, group in groups(obj):
            found.append((f"{obj['kind']}/{group_name}", group["template"]))
        if "submitterPodTemplate" in obj["spec"]:
            found.append((f"{obj['kind']}/submitter", obj["spec"]["submitterPodTemplate"]))
    return found


@pytest.mark.parametrize("where,template", pod_templates(), ids=[w for w, _ in pod_templates()])
def test_pod_templates_match_kubernetes_schema(where, template):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                    "template": template}
    kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


CORE_KINDS = ("PersistentVolumeClaim", "Deployment", "Service")


def core_objects() -> list[dict]:
    """Kubernetes' own objects in cluster/kuberay (the claim, the web app, MLflow)."""
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)
            if d["kind"] in CORE_KINDS]


@pytest.mark.parametrize("obj", core_objects(),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_objects_match_kubernetes_schema(obj):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# -- one image, one Ray, one storage, GPUs where the work runs -------------------------------------


def test_every_pod_runs_the_one_image_of_the_dockerfile_and_the_locked_ray():
    images = {ray_container(g)["image"] for obj in ray_objects() for _, g in groups(obj)}
    assert len(images) == 1, f"one image for every node, found {images}"
    (image,) = images
    assert f"-t {image} ." in (CLUSTER / "Dockerfile").read_text()
    ray_version = locked_version("ray")
    for obj in ray_objects():
        assert cluster_spec(obj)["rayVersion"] == ray_version, f"{obj['kind']}: not uv.lock's Ray"


def test_every_pod_mounts_the_shared_claim():
    (claim,) = [d for d in load_docs(STORAGE) if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "all nodes write checkpoints"
    for obj in ray_objects():
        for group_name, group in groups(obj):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in ray_container(group)["volumeMounts"]}
            assert SHARED_MOUNT in mounts, f"{obj['kind']}/{group_name}"
            volume = volumes[mounts[SHARED_MOUNT]]
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_head_runs_no_workers_and_workers_have_gpus():
    for obj in ray_objects():
        head = cluster_spec(obj)["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", obj["kind"]
        workers = cluster_spec(obj)["workerGroupSpecs"]
        assert workers
        for group in workers:
            limits = ray_container(group)["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{obj['kind']}/{group['groupName']}"


# -- entry points and config files named by every command ------------------------------------------


def _join_continuations(text: str) -> str:
    return re.sub(r"\\\n\s*#?", " ", text)


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def command_lines(path: Path) -> list[str]:
    """Lines of a cluster file that may hold commands, with shell continuations joined."""
    text = path.read_text()
    if path.suffix == ".yaml":
        comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines()
                             if line.lstrip().startswith("#"))
        values = [" ".join(s.split("\n")) for d in load_docs(path) for s in _strings(d)]
        return _join_continuations(comments).splitlines() + values
    if path.suffix == ".md":
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        return _join_continuations("\n".join(blocks)).splitlines()
    return _join_continuations(text).splitlines()


def command_files() -> list[Path]:
    return [*yaml_files(), CLUSTER / "README.md", CLUSTER / "Dockerfile"]


def parse_commands(line: str) -> list[tuple[str, str, list[str]]]:
    """(kind, name, args) of `python -m faceage.X`, `faceage X` and `serve run|deploy` in a line."""
    found = []
    for segment in re.split(r"&&|;|\||'|\"|`|\(|\)", line):
        segment = segment.strip()
        if m := re.search(r"python -m (faceage[\w.]*)(.*)$", segment):
            found.append(("module", m.group(1), shlex.split(m.group(2))))
        elif m := re.search(r"(?:^|^uv run\s+|\s--\s+)faceage\s+([a-z][\w-]*)(.*)$", segment):
            found.append(("cli", m.group(1), shlex.split(m.group(2))))
        elif m := re.search(r"(?:^|\s)serve\s+(run|deploy)\s+(.*)$", segment):
            found.append(("serve", m.group(1), shlex.split(m.group(2))))
    return found


def invocations() -> list[tuple[str, str, str, list[str]]]:
    """(file, kind, name, args) of every command in the cluster files."""
    return [(str(path.relative_to(ROOT)), *command)
            for path in command_files()
            for line in command_lines(path)
            for command in parse_commands(line)]


def _option_values(args: list[str], flag: str) -> list[str]:
    """Values after ``flag`` up to the next option (``--set a=1 b=2`` gives both)."""
    values, taking = [], False
    for arg in args:
        if arg.startswith("--"):
            taking = arg == flag
        elif taking:
            values.append(arg)
    return values


def faceage_subcommands() -> set[str]:
    """Subcommands the `faceage` CLI registers (its command table imports no torch)."""
    from faceage.cli import COMMANDS

    return set(COMMANDS)


def _check_repo_file(rel: str) -> None:
    if not (ROOT / rel).exists():
        pytest.fail(f"{rel} does not exist in the repository")


def test_commands_name_the_three_entry_points():
    kinds = {(kind, name) for _, kind, name, _ in invocations()}
    assert ("module", "faceage.train") in kinds
    assert ("cli", "tune") in kinds
    assert ("serve", "run") in kinds or ("serve", "deploy") in kinds


@pytest.mark.parametrize("rel,kind,name,args", invocations(),
                         ids=[f"{r}:{k}:{n}" for r, k, n, _ in invocations()])
def test_command_names_an_entry_point_and_config_that_exist(rel, kind, name, args):
    if kind == "module":
        module_file = ROOT / (name.replace(".", "/") + ".py")
        assert module_file.is_file(), f"{rel}: python -m {name}: no {module_file}"
        assert 'if __name__ == "__main__":' in module_file.read_text(), f"{name} cannot run"
    elif kind == "cli":
        subcommands = faceage_subcommands()
        if name not in subcommands:
            pytest.fail(f"{rel}: faceage {name} is not a subcommand of {sorted(subcommands)}")
    configs = [args[0]] if kind == "serve" else _option_values(args, "--config")
    assert configs, f"{rel}: {name} without a config file"
    for config in configs:
        _check_repo_file(config)


TRAIN_INVOCATIONS = [i for i in invocations() if i[1:3] == ("module", "faceage.train")]


TUNE_INVOCATIONS = [i for i in invocations()
                    if i[1:3] in (("cli", "tune"), ("module", "faceage.tune"))]


def _on_shared_storage(path: str) -> bool:
    return path.startswith(SHARED_MOUNT + "/") or "://" in path


@pytest.mark.parametrize("rel,kind,name,args", TRAIN_INVOCATIONS,
                         ids=[r for r, *_ in TRAIN_INVOCATIONS])
def test_training_command_runs_on_a_cluster(rel, kind, name, args):
    """Every `--set` loads with the real config schema, and passes the job-path check."""
    from faceage.config import load_config

    (config,) = _option_values(args, "--config")
    cfg = load_config(ROOT / config, _option_values(args, "--set"))
    assert _on_shared_storage(cfg.storage_path), f"{rel}: storage_path {cfg.storage_path}"
    assert [_on_shared_storage(s.path) for s in cfg.data.sources] == [True], f"{rel}: data.path"


@pytest.mark.parametrize("rel,kind,name,args", TUNE_INVOCATIONS,
                         ids=[r for r, *_ in TUNE_INVOCATIONS])
def test_tune_command_runs_on_a_cluster(rel, kind, name, args, monkeypatch):
    """The tune commands load, and their trials' storage and data are on the shared volume."""
    from faceage.training.checks import check_job_paths
    from faceage.training.tune.plan import load_tune_settings, plan_search

    (config,) = _option_values(args, "--config")
    settings = load_tune_settings(ROOT / config, _option_values(args, "--set"))
    base = plan_search(settings, (ROOT / config).parent).base
    assert _on_shared_storage(base.storage_path), f"{rel}: storage_path {base.storage_path}"
    assert [_on_shared_storage(s.path) for s in base.data.sources] == [True], f"{rel}: data.path"
    # As a Ray job with --working-dir: relative paths would be refused.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {
        "working_dir": "gcs://_ray_pkg_x.zip"}}))
    check_job_paths(base)


def test_train_and_tune_commands_are_documented_for_both_setups():
    for path in (CLUSTER / "README.md", LAUNCHER):
        rel = str(path.relative_to(ROOT))
        assert any(r == rel for r, *_ in TRAIN_INVOCATIONS), f"{rel}: no train command"
        assert any(r == rel for r, *_ in TUNE_INVOCATIONS), f"{rel}: no tune command"


def test_rayjob_matches_its_training_scale():
    job = by_kind("RayJob")
    ((kind, name, args),) = parse_commands(job["spec"]["entrypoint"])
    assert (kind, name) == ("module", "faceage.train")
    overrides = dict(o.split("=", 1) for o in _option_values(args, "--set"))
    assert overrides["scaling.use_gpu"] == "true"
    assert overrides["data.path"].startswith(SHARED_MOUNT)
    assert overrides["storage_path"].startswith(SHARED_MOUNT)
    (gpu_group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus_per_pod = int(ray_container(gpu_group)["resources"]["limits"]["nvidia.com/gpu"])
    cpus_per_pod = float(ray_container(gpu_group)["resources"]["limits"]["cpu"])
    workers = int(overrides["scaling.num_workers"])
    assert workers <= gpu_group["replicas"] * gpus_per_pod, "more training workers than GPUs"
    assert float(overrides["scaling.cpus_per_worker"]) * workers <= cpus_per_pod * gpu_group[
        "replicas"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # KubeRay pastes the entrypoint unquoted into the submitter pod's shell command line.
    assert not re.search(r"&&|;|\||`|\$\(", job["spec"]["entrypoint"]), "one plain command"
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert ray_container(head)["workingDir"] == workdir, "relative config paths resolve there"


def test_paths_named_in_cluster_files_exist():
    pattern = re.compile(r"(?<![\w/~.-])((?:configs|serve|cluster|models|tests)/[\w./-]*\w)")
    named = {m for p in command_files() for m in pattern.findall(p.read_text())}
    assert "configs/train.yaml" in named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == []


# -- Serve on the cluster is serve/config.yaml ----------------------------------------------------


def serve_config_v2() -> dict:
    return yaml.safe_load(by_kind("RayService")["spec"]["serveConfigV2"])


@pytest.mark.slow  # importing ray.serve alone takes ~8 s on two loaded cores
def test_serve_config_v2_is_a_valid_serve_config():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config_v2())
    assert config.http_options.host == "0.0.0.0", "the Kubernetes serve Service must reach it"
    for app in config.applications:
        for deployment in app.deployments:
            if isinstance(deployment.autoscaling_config, dict):
                AutoscalingConfig(**deployment.autoscaling_config)
            if deployment.name in ("Detector", "AgeRegressor"):
                assert deployment.ray_actor_options.num_gpus, f"{deployment.name} gets no GPU"


def _generator():
    spec = importlib.util.spec_from_file_location("cluster_generate", CLUSTER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_cluster_files_are_up_to_date():
    """serveConfigV2, cluster/serve.yaml and the Serve env of the image and the launcher."""
    stale = [str(p.relative_to(ROOT)) for p in _generator().stale()]
    assert stale == [], f"run `uv run python cluster/generate.py`: {stale} lag behind"


def _flatten(node, prefix=()) -> dict[tuple, object]:
    """Leaf values by path; list items of named mappings are keyed by their name."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, (*prefix, key))
                .items()} or {prefix: {}}
    if isinstance(node, list) and node and all(isinstance(i, dict) and "name" in i for i in node):
        return {k: v for item in node for k, v in _flatten(item, (*prefix, item["name"])).items()}
    return {prefix: node}


def test_cluster_serve_config_is_serve_config_yaml_plus_the_overlay_field_by_field():
    _check_repo_file("serve/config.yaml")
    local = _flatten(yaml.safe_load((ROOT / "serve/config.yaml").read_text()))
    overlay = _flatten(yaml.safe_load((CLUSTER / "serve-overlay.yaml").read_text()))
    for config in (serve_config_v2(), yaml.safe_load((CLUSTER / "serve.yaml").read_text())):
        cluster = _flatten(config)
        for path in sorted(set(local) | set(cluster) | set(overlay), key=str):
            changed = [o for o in overlay if path[:len(o)] == o or o[:len(path)] == path]
            if not changed:
                assert cluster.get(path) == local.get(path), f"{'.'.join(map(str, path))}"
            elif path in overlay:
                wanted = overlay[path]
                assert cluster.get(path, None) == wanted, f"{'.'.join(map(str, path))}"
    apps = {a["name"]: a for a in serve_config_v2()["applications"]}
    module = apps["faceage"]["import_path"].split(":")[0]
    _check_repo_file(module.replace(".", "/") + ".py")


def test_cluster_serve_config_keeps_its_own_rules():
    """The drift issue 33 found: queues and targets that contradict each other."""
    config = serve_config_v2()
    assert config["http_options"]["request_timeout_s"]
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        auto = deployment.get("autoscaling_config")
        limit = deployment.get("max_ongoing_requests")
        if auto and limit:
            assert auto["target_ongoing_requests"] <= limit, deployment["name"]
        assert not (auto and "num_replicas" in deployment), deployment["name"]
        batch = (deployment.get("user_config") or {}).get("max_batch_size")
        if batch:
            assert limit >= batch, f"{deployment['name']}: batches can never fill"


# -- one Serve environment, everywhere Serve runs --------------------------------------------------


def _env_of_shell(command: str) -> dict[str, str]:
    """Variables a shell line exports (``export A=1 B=2;``)."""
    found = {}
    for segment in re.findall(r"export ([^;]*)", command):
        for word in shlex.split(segment):
            key, _, value = word.partition("=")
            found[key] = value
    return found


def dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n\s*", " ", (CLUSTER / "Dockerfile").read_text())
    found = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            found[key] = value
    return found


def test_serve_env_is_one_list_that_local_serve_applies():
    from faceage.serving import local
    from faceage.serving.environment import SERVE_ENV, apply_serve_env

    assert local.apply_serve_env is apply_serve_env
    env = {"RAY_SERVE_LOG_TO_STDERR": "1"}
    assert apply_serve_env(env) == {**SERVE_ENV, "RAY_SERVE_LOG_TO_STDERR": "1"}, "explicit wins"
    args = yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"][0]["args"]
    assert int(SERVE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) > args["max_body_bytes"]
    assert SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Without HAProxy, direct ingress means a proxy on the head only: KubeRay's probe of every
    # worker's :8000/-/healthz would fail (tests/e2e/test_multinode.py runs it).
    assert SERVE_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1" or SERVE_ENV[
        "RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_the_image_carries_the_serve_env_and_no_pod_overrides_it():
    from faceage.serving.environment import SERVE_ENV

    image_env = dockerfile_env()
    assert {k: image_env.get(k) for k in SERVE_ENV} == SERVE_ENV
    for where, template in pod_templates():
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                assert var["name"] not in SERVE_ENV, f"{where}: sets {var['name']} itself"


def test_every_ray_start_of_the_launcher_carries_the_serve_env_and_token_auth():
    from faceage.serving.environment import SERVE_ENV

    cfg = load_docs(LAUNCHER)[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        env = _env_of_shell(start.split("ray start")[0])
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, key
        assert env.get("RAY_AUTH_MODE") == "token", key


def test_serve_env_means_to_ray_what_it_says():
    """Canary: Ray 2.60 reads these names as this list intends (no proxy-less nodes)."""
    from faceage.serving.environment import SERVE_ENV

    code = ("from ray.serve._private import constants as c; import json; print(json.dumps("
            "[c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.RAY_SERVE_ENABLE_HA_PROXY, "
            "c.RAY_SERVE_USE_GRPC_BY_DEFAULT, c.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, "
            "c.RAY_SERVE_LOG_TO_STDERR]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE")} | SERVE_ENV
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    direct, ha_proxy, grpc, limit, to_stderr = json.loads(out)
    assert (direct, ha_proxy, grpc, to_stderr) == (False, False, True, False)
    assert limit == int(SERVE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])


# -- token auth on every cluster -------------------------------------------------------------------


def test_token_auth_is_on_for_every_kuberay_cluster():
    secrets = set()
    for obj in ray_objects():
        auth = cluster_spec(obj).get("authOptions") or {}
        assert auth.get("mode") == "token", f"{obj['kind']}: authOptions.mode"
        secrets.add(auth.get("secretName"))
    (secret,) = secrets
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {secret}" in readme, "README: how to make the token"
    assert re.search(rf"kubectl get secret {secret}\b.*auth_token", readme), "how to read it"
    assert "RAY_AUTH_MODE=token" in readme


def test_token_auth_is_on_for_ray_up_clusters():
    cfg = load_docs(LAUNCHER)[0]
    assert cfg["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    readme = (CLUSTER / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme


# -- names ---------------------------------------------------------------------------------------


def test_object_names_and_head_services_are_distinct():
    docs = [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    for obj in ray_objects():
        name = obj["metadata"]["name"]
        if obj["kind"] == "RayJob":
            continue  # its cluster, and so its Service, gets a random suffix
        services.append(f"{name}-head-svc")
        if obj["kind"] == "RayService":
            services.append(f"{name}-serve-svc")
    assert len(services) == len(set(services)), sorted(services)
    # Every port-forward in the docs names a Service that exists.
    text = "\n".join(p.read_text() for p in command_files())
    for service in re.findall(r"port-forward svc/([\w-]+)", text):
        assert service in services, f"port-forward svc/{service}: no such Service"


# -- the rest of the platform ----------------------------------------------------------------------


def _docs_of(name: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in load_docs(KUBERAY / name)}


def test_webapp_points_at_the_rayservice_serve_service():
    service = by_kind("RayService")["metadata"]["name"]
    port = serve_config_v2()["http_options"]["port"]
    (deployment,) = [d for d in _docs_of("webapp.yaml").values() if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FACEAGE_SERVE_URL"] == f"http://{service}-serve-svc:{port}"
    assert container["image"] == ray_container(by_kind("RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"])["image"]
    assert "app/main.py" in container["command"]
    _check_repo_file("app/main.py")


def test_training_logs_to_the_mlflow_server():
    docs = _docs_of("mlflow.yaml")
    service = docs["Service/faceage-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    job = by_kind("RayJob")
    overrides = dict(o.split("=", 1) for o in _option_values(
        parse_commands(job["spec"]["entrypoint"])[0][2], "--set"))
    assert overrides["tracking.uri"] == f"http://{service['metadata']['name']}:{port}"
    server = docs["Deployment/faceage-mlflow"]
    assert server["spec"]["replicas"] == 1 and server["spec"]["strategy"]["type"] == "Recreate"
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(":v" + locked_version("mlflow-skinny"))
    store = container["command"][container["command"].index("--backend-store-uri") + 1]
    assert store.startswith("sqlite:////mlflow/db/") or store.startswith("postgresql")
    claim = docs["PersistentVolumeClaim/faceage-mlflow-db"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "SQLite on one writer's volume"


def test_podmonitor_scrapes_the_port_every_ray_container_names():
    (monitor,) = load_docs(KUBERAY / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for obj in ray_objects():
        for group_name, group in groups(obj):
            ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
            assert ports.get(endpoint["port"]) == 8080, f"{obj['kind']}/{group_name}"
        head = ray_container(cluster_spec(obj)["headGroupSpec"])
        env = {e["name"] for e in head.get("env", [])}
        assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= env


# -- the image -------------------------------------------------------------------------------------


def test_dockerfile_builds_the_locked_environment():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)[\w.-]*@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert base, "a Python base image, pinned by digest"
    assert re.search(r"^ARG UV_VERSION=\d+\.\d+\.\d+$", dockerfile, re.M), "a pinned uv"
    assert 'uv==${UV_VERSION}' in dockerfile
    assert re.search(r"driver.{0,40}\b580\b", dockerfile, re.S), "the NVIDIA driver it needs"
    pyproject = (ROOT / "pyproject.toml").read_text()
    minimum = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject)
    assert tuple(map(int, base.groups())) >= tuple(map(int, minimum.groups()))
    assert "COPY pyproject.toml uv.lock" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    assert re.search(r"apt-get install .*\bwget\b", dockerfile), "KubeRay's probes call wget"
    venv = re.search(r"UV_PROJECT_ENVIRONMENT=(\S+)", dockerfile).group(1)
    assert f"PATH={venv}/bin:" in dockerfile, "python, ray and serve must be the locked ones"
    # KubeRay runs `bash -lc "ray start ..."`; a login shell on Debian resets PATH from
    # /etc/profile, which then sources /etc/profile.d.
    assert re.search(rf"export PATH={re.escape(venv)}/bin:.*> /etc/profile\.d/\S+\.sh",
                     dockerfile), "login shells must find ray"
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
