"""cluster/ parses, matches its schemas, and names entry points and config files that exist."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
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
    ((remote, local),) = cfg["file_mounts"].items()
    assert (ROOT / local).resolve() == ROOT, "ray up runs from the repo root and syncs all of it"
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

# A JSON-schema subset of the ray.io/v1 CRDs (RayCluster, RayJob, RayService), written from
# KubeRay's Go API types (ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go, recent
# master). controller-gen makes a field required when its json tag has no omitempty and it has no
# +optional marker. Covered: every spec field KubeRay defines above the pod templates, with types,
# enums and required lists; unknown fields are errors, as `kubectl apply` reports them with
# server-side field validation. Older v1 releases also require rayStartParams (now optional), so
# it is required here and the manifests apply to both. The pod templates, a core/v1
# PodTemplateSpec in the CRD, are checked against Kubernetes' own schema in
# test_pod_templates_match_kubernetes_schema. Not covered: status, and CEL rules beyond those that
# operator_rule_violations restates.

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_MANAGED_BY = {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"metadata": _OBJECT, "spec": {
        "type": "object", "required": ["containers"],
        "properties": {"containers": {"type": "array", "minItems": 1}}}},
}
_GROUP_COMMON = {
    "template": {"$ref": "#/$defs/PodTemplateSpec"},
    "rayStartParams": _STRING_MAP,
    "resources": _STRING_MAP,
    "labels": _STRING_MAP,
}
CRD_DEFS = {
    "PodTemplateSpec": _POD_TEMPLATE,
    "HeadGroupSpec": {
        "type": "object", "additionalProperties": False,
        "required": ["rayStartParams", "template"],
        "properties": {**_GROUP_COMMON, "headService": _OBJECT, "ingressOptions": _OBJECT,
                       "enableIngress": {"type": "boolean"}, "serviceType": {"type": "string"}},
    },
    "WorkerGroupSpec": {
        "type": "object", "additionalProperties": False,
        "required": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
        "properties": {
            **_GROUP_COMMON, "suspend": {"type": "boolean"}, "groupName": {"type": "string"},
            "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
            "idleTimeoutSeconds": _INT32, "priority": _INT32, "numOfHosts": _INT32,
            "scaleStrategy": {"type": "object", "additionalProperties": False,
                              "properties": {"workersToDelete": _STRINGS}},
        },
    },
    "AutoscalerOptions": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "resources": _OBJECT, "image": {"type": "string"},
            "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
            "securityContext": _OBJECT, "idleTimeoutSeconds": _INT32,
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "version": {"enum": ["v1", "v2"]}, "env": {"type": "array"},
            "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
            "command": _STRINGS, "args": _STRINGS,
        },
    },
    "RayClusterSpec": {
        "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
        "properties": {
            "upgradeStrategy": {"type": "object", "additionalProperties": False,
                                "properties": {"type": {"enum": ["Recreate", "None"]}}},
            "authOptions": _OBJECT, "suspend": {"type": "boolean"}, "managedBy": _MANAGED_BY,
            "autoscalerOptions": {"$ref": "#/$defs/AutoscalerOptions"},
            "headServiceAnnotations": _STRING_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
            "gcsFaultToleranceOptions": _OBJECT, "historyServerOptions": _OBJECT,
            "networkPolicy": _OBJECT, "tlsOptions": _OBJECT,
            "headGroupSpec": {"$ref": "#/$defs/HeadGroupSpec"},
            "rayVersion": {"type": "string"},
            "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/WorkerGroupSpec"}},
        },
    },
    "RayJobSpec": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "activeDeadlineSeconds": _INT32, "backoffLimit": _INT32,
            "rayClusterSpec": {"$ref": "#/$defs/RayClusterSpec"},
            "submitterPodTemplate": {"$ref": "#/$defs/PodTemplateSpec"},
            "metadata": _STRING_MAP, "clusterSelector": _STRING_MAP,
            "submitterConfig": {"type": "object", "additionalProperties": False,
                                "properties": {"backoffLimit": _INT32}},
            "managedBy": _MANAGED_BY,
            "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf",
                                        "DeleteNone"]},
            "deletionStrategy": _OBJECT, "submitterFinishedTimeoutSeconds": _INT32,
            "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode",
                                        "SidecarMode"]},
            "entrypointResources": {"type": "string"}, "entrypoint": {"type": "string"},
            "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
            "ttlSecondsAfterFinished": _INT32, "shutdownAfterJobFinishes": {"type": "boolean"},
            "suspend": {"type": "boolean"},
        },
    },
    "RayServiceSpec": {
        "type": "object", "additionalProperties": False, "required": ["rayClusterConfig"],
        "properties": {
            "rayClusterDeletionDelaySeconds": {**_INT32, "minimum": 0},
            "serviceUnhealthySecondThreshold": _INT32,
            "deploymentUnhealthySecondThreshold": _INT32,
            "serveService": _OBJECT,
            "upgradeStrategy": {
                "type": "object", "additionalProperties": False,
                "properties": {"type": {"enum": ["NewClusterWithIncrementalUpgrade", "NewCluster",
                                                 "None"]},
                               "clusterUpgradeOptions": _OBJECT}},
            "serveConfigV2": {"type": "string"},
            "rayClusterConfig": {"$ref": "#/$defs/RayClusterSpec"},
            "excludeHeadPodFromServeSvc": {"type": "boolean"},
        },
    },
}


def crd_schema(kind: str) -> dict:
    """The object schema of one ray.io/v1 kind: apiVersion, kind, metadata.name and spec."""
    return {
        "$defs": CRD_DEFS,
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}, "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP}},
            "spec": {"$ref": f"#/$defs/{kind}Spec"},
        },
    }


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


@pytest.mark.parametrize("obj", ray_objects(), ids=lambda o: o["kind"])
def test_ray_object_matches_its_crd(obj):
    jsonschema.validate(obj, crd_schema(obj["kind"]))
    assert operator_rule_violations(obj) == []


def test_crd_schema_catches_mistakes():
    """The subset rejects what the real CRDs reject, so a passing manifest means something."""
    cluster = by_kind("RayCluster")
    mistakes = []
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    mistakes.append(typo)
    no_max = copy.deepcopy(cluster)
    del no_max["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    mistakes.append(no_max)
    old_api = copy.deepcopy(cluster)
    old_api["apiVersion"] = "ray.io/v1alpha1"
    mistakes.append(old_api)
    no_cluster = copy.deepcopy(by_kind("RayService"))
    del no_cluster["spec"]["rayClusterConfig"]
    mistakes.append(no_cluster)
    bad_mode = copy.deepcopy(by_kind("RayJob"))
    bad_mode["spec"]["submissionMode"] = "K8sMode"
    mistakes.append(bad_mode)
    for obj in mistakes:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, crd_schema(obj["kind"]))
    long_name = copy.deepcopy(by_kind("RayJob"))
    long_name["metadata"]["name"] = "faceage-" + "x" * 40
    assert operator_rule_violations(long_name)


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


def test_storage_claim_matches_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in load_docs(STORAGE):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


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
    """Subcommands the `faceage` CLI registers, read from source: importing it imports torch."""
    sources = "\n".join(p.read_text() for p in (ROOT / "faceage").glob("*.py"))
    return set(re.findall(r"add_parser\(\s*[\"'](\w[\w-]*)[\"']", sources))


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


@pytest.mark.parametrize("rel,kind,name,args", TRAIN_INVOCATIONS,
                         ids=[r for r, *_ in TRAIN_INVOCATIONS])
def test_training_overrides_are_valid_config_keys(rel, kind, name, args):
    """Every `--set` in a cluster command loads with the real config schema."""
    from faceage.config import load_config

    (config,) = _option_values(args, "--config")
    cfg = load_config(ROOT / config, _option_values(args, "--set"))
    if "storage_path" in " ".join(args):
        assert cfg.storage_path.startswith(SHARED_MOUNT) or "://" in cfg.storage_path


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
            assert deployment.ray_actor_options.num_gpus, f"{deployment.name} gets no GPU"


def test_serve_config_v2_runs_the_application_of_serve_config_yaml():
    _check_repo_file("serve/config.yaml")
    local = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    local_apps = {a["name"]: a for a in local["applications"]}
    cluster_apps = {a["name"]: a for a in serve_config_v2()["applications"]}
    assert cluster_apps.keys() == local_apps.keys()
    for name, app in cluster_apps.items():
        for key in ("import_path", "route_prefix"):
            assert app.get(key) == local_apps[name].get(key), f"{name}: {key} differs"
        local_deployments = {d["name"] for d in local_apps[name].get("deployments", [])}
        if local_deployments:
            assert {d["name"] for d in app.get("deployments", [])} <= local_deployments
    module = cluster_apps[next(iter(cluster_apps))]["import_path"].split(":")[0]
    _check_repo_file(module.replace(".", "/") + ".py")


# -- the image -------------------------------------------------------------------------------------


def test_dockerfile_builds_the_locked_environment():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)", dockerfile, re.M)
    assert base, "a Python base image"
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
