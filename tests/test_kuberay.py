"""The KubeRay manifests (deploy/kuberay/) and the image (deploy/Dockerfile), checked offline.

Every ``ray.io`` manifest is validated against the ``v1`` ``openAPIV3Schema`` of the KubeRay
CRDs in ``../shared/kuberay-crds/`` the way the API server treats a create with strict field
validation (``kubectl apply``'s default):

1. null values of fields that are not ``nullable`` are dropped;
2. the schema's ``default``s are applied, wherever the parent object exists;
3. the object is validated, with the structural-schema rules turned into JSON Schema: an
   object with ``properties`` admits no other field, an object with neither ``properties``
   nor ``additionalProperties`` admits none at all, unless
   ``x-kubernetes-preserve-unknown-fields``; ``x-kubernetes-int-or-string`` is an integer or
   a string; an ``x-kubernetes-embedded-resource`` carries apiVersion, kind and ObjectMeta;
   ``int32``/``int64`` formats are range-checked; list-type ``map``/``set`` have unique keys.

CEL rules (``x-kubernetes-validations``, here only immutability on update) are not evaluated.
No cluster, no network: plain and fast.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.deployment import DeploymentSpec

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUBERAY = REPO / "deploy" / "kuberay"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SERVE_CONFIG = REPO / "deploy" / "serve" / "config.yaml"
MANIFESTS = ("raycluster.yaml", "rayservice.yaml", "rayjob.yaml", "storage.yaml")
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {  # metav1.ObjectMeta, the fields a manifest may set
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array"},
    },
}
STRUCTURE = ("properties", "items", "additionalProperties")


# -- Kubernetes structural-schema semantics ----------------------------------------------------


def strict(schema: dict, root: bool = False) -> dict:
    """A JSON Schema (draft 4) that rejects what a strict API server rejects under ``schema``."""
    out = {k: v for k, v in schema.items() if k not in STRUCTURE}
    props = {name: strict(sub) for name, sub in schema.get("properties", {}).items()}
    if schema.get("x-kubernetes-embedded-resource"):
        props = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, **props, "metadata": OBJECT_META}
    if root:
        props["metadata"] = {**OBJECT_META, "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}]}
    if props:
        out["properties"] = props
    if "items" in schema:
        out["items"] = strict(schema["items"])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = strict(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # unknown fields (all of them, without properties) are rejected
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def defaulted(value, schema: dict):
    """``value`` as the API server stores it: non-nullable nulls dropped, ``default``s applied."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        value = {k: v for k, v in value.items() if v is not None or props.get(k, {}).get("nullable")}
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        return {k: defaulted(v, props[k] if k in props else extra if isinstance(extra, dict) else {})
                for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [defaulted(v, schema["items"]) for v in value]
    return value


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [json.dumps([item.get(n) for n in names]) for item in instance if isinstance(item, dict)]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        yield jsonschema.ValidationError(f"duplicate entries {', '.join(repeated)} in a list of type {list_type}")


KubeValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


def kube_validator(schema: dict):
    """A validator of ``strict(schema)``'s kind, with the integer formats range-checked."""
    formats = jsonschema.FormatChecker(formats=())
    for name, (low, high) in INT_RANGES.items():
        formats.checks(name)(lambda v, low=low, high=high: not isinstance(v, int) or low <= v <= high)
    return KubeValidator(schema, format_checker=formats)


@dataclass
class Crd:
    group: str
    kind: str
    schema: dict  # the v1 openAPIV3Schema as published
    validator: object  # its strict form

    def errors(self, doc: dict, defaults: bool = True) -> list[str]:
        """What the API server would refuse in ``doc``, one line each (empty: accepted)."""
        found = []
        if doc.get("apiVersion") != f"{self.group}/v1":
            found.append(f"apiVersion: {doc.get('apiVersion')!r} is not {self.group}/v1")
        obj = defaulted(doc, self.schema) if defaults else doc
        for err in sorted(self.validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            found.append(f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}")
        return found


def load_crd(path: Path) -> Crd:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    return Crd(crd["spec"]["group"], crd["spec"]["names"]["kind"], schema, kube_validator(strict(schema, root=True)))


@pytest.fixture(scope="module")
def crds() -> dict[str, Crd]:
    """The three CRDs by kind, loaded once (about a megabyte of YAML each)."""
    if not CRDS.is_dir():
        pytest.fail(f"the KubeRay CRDs are missing: expected them in {CRDS} (see DESIGN.md, 'Data and models')")
    loaded = [load_crd(CRDS / f"ray.io_{name}.yaml") for name in ("rayclusters", "rayservices", "rayjobs")]
    return {crd.kind: crd for crd in loaded}


# -- the manifests -----------------------------------------------------------------------------


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]


def one(kind: str) -> dict:
    (doc,) = [d for name in MANIFESTS for d in documents(name) if d["kind"] == kind]
    return doc


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": one("RayCluster")["spec"], "RayService": one("RayService")["spec"]["rayClusterConfig"],
            "RayJob": one("RayJob")["spec"]["rayClusterSpec"]}


def serve_config() -> dict:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def service_spec() -> DeploymentSpec:
    (app,) = serve_config()["applications"]
    return DeploymentSpec.from_dict(app["args"]["spec"])


def batch_spec() -> DeploymentSpec:
    return DeploymentSpec.from_dict(yaml.safe_load(one("ConfigMap")["data"]["deployment.yaml"]))


def pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def start_resources(group: dict) -> dict:
    """The custom resources of ``rayStartParams.resources`` (shell-quoted JSON, as KubeRay passes it)."""
    text = group["rayStartParams"].get("resources")
    return json.loads(shlex.split(text)[0]) if text else {}


def mounts(pod: dict) -> dict[str, tuple[str, bool]]:
    """mount path -> (volume source kind and name, read-only) for the pod's first container."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    out = {}
    for m in pod["spec"]["containers"][0].get("volumeMounts", []):
        v = volumes[m["name"]]
        source = (f"pvc/{v['persistentVolumeClaim']['claimName']}" if "persistentVolumeClaim" in v
                  else f"configmap/{v['configMap']['name']}" if "configMap" in v else "other")
        out[m["mountPath"]] = (source, bool(m.get("readOnly")))
    return out


def mounted(path: str, pod: dict) -> tuple[str, str, bool] | None:
    """(mount path, source, read-only) of the mount holding ``path`` in ``pod``, or None."""
    for where, (source, read_only) in mounts(pod).items():
        if path == where or path.startswith(where.rstrip("/") + "/"):
            return where, source, read_only
    return None


RAY_DOCS = [(name, i) for name in MANIFESTS for i, d in enumerate(documents(name)) if d["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize("name,index", RAY_DOCS, ids=[f"{n}:{i}" for n, i in RAY_DOCS])
def test_manifest_validates_against_its_crd(crds, name, index):
    doc = documents(name)[index]
    assert crds[doc["kind"]].errors(doc) == []


def test_every_kind_has_a_manifest():
    kinds = {d["kind"] for name in MANIFESTS for d in documents(name)}
    assert {"RayCluster", "RayService", "RayJob", "PersistentVolumeClaim", "Job", "ConfigMap"} <= kinds


def _set(path: str, value):
    def change(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return change


DELETE = object()
HEAD = "spec.headGroupSpec"
WORKER = "spec.workerGroupSpecs.0"
CONTAINER = f"{HEAD}.template.spec.containers.0"
BROKEN = {  # a RayCluster edit -> a piece of the error it must cause
    "unknown field in a group": (_set(f"{WORKER}.replica", 2), "'replica' was unexpected"),
    "unknown field in a container": (_set(f"{CONTAINER}.imagePullPolicyy", "Always"), "'imagePullPolicyy' was unexpected"),
    "unknown field under spec": (_set("spec.headGroup", {}), "'headGroup' was unexpected"),
    "unknown field in metadata": (_set("metadata.label", {"a": "b"}), "'label' was unexpected"),
    "a list for a map": (_set(f"{HEAD}.rayStartParams", ["num-cpus=0"]), "is not of type 'object'"),
    "rayStartParams value not a string": (_set(f"{HEAD}.rayStartParams.num-cpus", 0), "0 is not of type 'string'"),
    "replicas as a string": (_set(f"{WORKER}.replicas", "2"), "'2' is not of type 'integer'"),
    "replicas beyond int32": (_set(f"{WORKER}.replicas", 2**31), "is not a 'int32'"),
    "quantity neither int nor string": (_set(f"{CONTAINER}.resources.limits.cpu", True), "True is not valid under any"),
    "quantity with a bad unit": (_set(f"{CONTAINER}.resources.limits.memory", "8 GB"), "does not match"),
    "duplicate container port": (_set(f"{CONTAINER}.ports.1.containerPort", 6379), "duplicate entries"),
    "missing groupName": (_set(f"{WORKER}.groupName", DELETE), "'groupName' is a required property"),
    "missing container name": (_set(f"{CONTAINER}.name", DELETE), "'name' is a required property"),
    "missing head template": (_set(f"{HEAD}.template", DELETE), "'template' is a required property"),
    "missing metadata.name": (_set("metadata.name", DELETE), "is not valid under any of the given schemas"),
    "a null for a required field": (_set(f"{WORKER}.groupName", None), "'groupName' is a required property"),
    "wrong apiVersion": (_set("apiVersion", "ray.io/v1alpha2"), "is not ray.io/v1"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_copy_is_rejected(crds, case):
    change, expected = BROKEN[case]
    doc = copy.deepcopy(one("RayCluster"))
    change(doc)
    errors = crds["RayCluster"].errors(doc)
    assert any(expected in e for e in errors), errors


def test_defaults_are_applied_before_validation(crds):
    """minReplicas and maxReplicas are required, and defaulted (0, 2147483647) by the API server."""
    doc = copy.deepcopy(one("RayCluster"))
    for group in doc["spec"]["workerGroupSpecs"]:
        del group["minReplicas"], group["maxReplicas"]
    assert crds["RayCluster"].errors(doc) == []
    stored = defaulted(doc, crds["RayCluster"].schema)["spec"]
    group = stored["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"], group["numOfHosts"]) == (0, 2**31 - 1, 1)
    assert stored["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"
    assert any("'minReplicas' is a required property" in e for e in crds["RayCluster"].errors(doc, defaults=False))


def test_structural_rules_on_small_schemas():
    """preserve-unknown-fields, embedded resources, int-or-string and nullable, as the API server reads them."""
    schema = {"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object"},
        "embedded": {"type": "object", "x-kubernetes-embedded-resource": True,
                     "properties": {"spec": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
        "plain": {"type": "string"},
    }}
    check = jsonschema.Draft4Validator(strict(schema))
    assert check.is_valid({"free": {"anything": [1, {"x": 2}]}})
    assert not check.is_valid({"closed": {"x": 1}})
    assert check.is_valid({"embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"a": 1}}})
    assert not check.is_valid({"embedded": {"spec": {"b": 1}}})
    assert not check.is_valid({"embedded": {"metadata": {"nam": "p"}}})
    assert check.is_valid({"port": 80}) and check.is_valid({"port": "http"}) and not check.is_valid({"port": 1.5})
    assert check.is_valid({"maybe": None})
    assert defaulted({"plain": None, "maybe": None}, schema) == {"maybe": None}


# -- the Serve config and the batch job --------------------------------------------------------


def test_serve_config_builds_a_deployment_spec():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    build_app = getattr(importlib.import_module(module), attribute)
    build_app(app["args"])  # the app's own check of its args; binds, starts nothing
    assert app["args"]["model_name"] == Path(service_spec().model.path).name
    cluster = cluster_specs()["RayService"]  # every ingress replica finds its CPUs on a worker (the head has none)
    worker_cpus = sum(g["replicas"] * float(g["rayStartParams"].get(
        "num-cpus", g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])) for g in cluster["workerGroupSpecs"])
    (ingress,) = app["deployments"]
    assert ingress["autoscaling_config"]["max_replicas"] * ingress["ray_actor_options"]["num_cpus"] <= worker_cpus


def test_serve_config_matches_deploy_serve_config():
    """The app, its ingress and its autoscaling are deploy/serve/config.yaml's; only the spec's values differ."""
    local = yaml.safe_load(SERVE_CONFIG.read_text())
    (ours,), (theirs,) = serve_config()["applications"], local["applications"]
    assert ours["import_path"] == theirs["import_path"] == "deploy.serve.app:build_app"
    assert ours["deployments"] == theirs["deployments"]
    assert set(ours["args"]) >= set(theirs["args"])


def test_batch_job_runs_the_batch_entrypoint_on_the_spec():
    from deploy.batch import parse_args

    job = one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "deploy.batch"]
    config = parse_args(argv[3:])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]  # the entrypoint runs on the head
    where, source, _ = mounted(config.spec, head)
    assert source == f"configmap/{one('ConfigMap')['metadata']['name']}"
    assert config.spec == f"{where}/deployment.yaml"
    for path, writes in ((config.input, False), (config.output, True)):
        _, source, read_only = mounted(str(path), head)
        assert source.startswith("pvc/") and not (writes and read_only), path
    assert batch_spec() == service_spec()


# -- the cluster shape -------------------------------------------------------------------------


def test_three_manifests_bring_up_the_same_cluster():
    specs = cluster_specs()
    reference = specs.pop("RayCluster")
    for kind, spec in specs.items():
        assert spec["workerGroupSpecs"] == reference["workerGroupSpecs"], kind
        assert spec["headGroupSpec"]["rayStartParams"] == reference["headGroupSpec"]["rayStartParams"], kind
        assert spec["rayVersion"] == reference["rayVersion"], kind


@pytest.mark.parametrize("kind", ["RayCluster", "RayService", "RayJob"])
def test_cluster_fits_the_deployment_spec(kind):
    cluster, spec = cluster_specs()[kind], service_spec()
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head schedules no work
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for resource, need, count in (("expert_store", spec.stores.resources, spec.stores.count),
                                  ("decoder", spec.decoders.resources, spec.decoders.count)):
        (group,) = [g for g in groups.values() if resource in start_resources(g)]
        assert start_resources(group)[resource] * group["replicas"] >= need[resource] * count, (kind, resource)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (decoders,) = [g for g in groups.values() if "decoder" in start_resources(g)]
    limits = decoders["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) >= spec.decoders.num_gpus
    assert spec.decoders.device.startswith("cuda") == bool(spec.decoders.num_gpus)
    (stores,) = [g for g in groups.values() if "expert_store" in start_resources(g)]
    assert "nvidia.com/gpu" not in stores["template"]["spec"]["containers"][0]["resources"]["limits"]
    for pod in pods(cluster):  # the model and the shards are at the same path on every pod
        for path in (spec.model.path, spec.model.shards):
            found = mounted(path, pod)
            assert found is not None and found[1] == "pvc/specmoe-data", (kind, path)


def test_model_volume_and_its_prepare_job(crds):
    claim, job = one("PersistentVolumeClaim"), one("Job")
    assert claim["metadata"]["name"] == "specmoe-data"
    assert set(claim["spec"]) <= {"accessModes", "resources", "storageClassName", "volumeMode", "selector"}
    pod_template = crds["RayCluster"].schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    assert list(kube_validator(strict(pod_template)).iter_errors(defaulted(job["spec"]["template"], pod_template))) == []
    spec, pod = service_spec(), job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    model = {e["name"]: e["value"] for e in container["env"]}["MODEL"]
    assert spec.model.path == f"/data/models/{model}" and spec.model.shards == f"/data/shards/{model}"
    assert 'specmoe prepare "/data/models/$MODEL" "/data/shards/$MODEL"' in container["args"][0]
    assert mounted(spec.model.path, pod)[1:] == ("pvc/specmoe-data", False)
    assert (REPO / "models" / model / "config.json").is_file()  # the image copies it from here


# -- the image ---------------------------------------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    lines, out = [], []
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        lines.append(raw.rstrip())
        if not raw.rstrip().endswith("\\"):
            text = " ".join(part.rstrip("\\").strip() for part in lines)
            lines = []
            word, _, rest = text.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in dockerfile() if word == "ARG" and "=" in arg)


def ignored(path: str) -> bool:
    """Whether Dockerfile.dockerignore drops ``path`` (or a folder above it) from the build context."""
    patterns = [p.strip() for p in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            return True
    return False


def copies() -> list[tuple[list[str], str]]:
    out = []
    for word, args in dockerfile():
        if word == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def test_dockerfile_copies_what_exists_and_every_package():
    for sources, _ in copies():
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
            assert not ignored(source), f"COPY {source}: excluded by Dockerfile.dockerignore"
    copied = {source for sources, _ in copies() for source in sources}
    found = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.split(".")[0] for p in __import__("setuptools").find_packages(REPO, include=found)}
    assert packages and packages <= copied, packages - copied
    assert {"pyproject.toml", pyproject()["project"]["readme"]} <= copied
    shipped = Path(DeploymentSpec().model.path).relative_to(REPO).as_posix()
    assert shipped in copied
    installs = [args for word, args in dockerfile() if word == "RUN" and "pip install" in args]
    assert any("-e ." in args for args in installs)  # editable: the shipped model sits next to the packages


def test_dockerfile_pins_match_pyproject_and_manifests():
    from packaging.requirements import Requirement

    requirements = {r.name: r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    args = build_args()
    assert requirements["torch"].specifier == f"=={args['TORCH_VERSION']}"
    assert "cpu" in args["TORCH_INDEX"] and args["VARIANT"] == "cpu"  # the default build is the CPU one
    ray = args["RAY_VERSION"]
    assert requirements["ray"].specifier.contains(ray)
    assert ray.split(".")[0] == importlib.metadata.version("ray").split(".")[0]
    (base,) = [a for w, a in dockerfile() if w == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}"
    python = re.fullmatch(r"py3(\d+)", args["PYTHON"])
    assert python and pyproject()["project"]["requires-python"] == ">=3.10" and int(python[1]) >= 10
    assert any(w == "ENV" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1" in a for w, a in dockerfile())
    image = f"specmoe:{pyproject()['project']['version']}"
    for kind, cluster in cluster_specs().items():
        assert cluster["rayVersion"] == ray, kind
        for pod in pods(cluster):
            assert [c["image"] for c in pod["spec"]["containers"]] == [image], kind
    assert [c["image"] for c in one("Job")["spec"]["template"]["spec"]["containers"]] == [image]

