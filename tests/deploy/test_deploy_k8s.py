"""deploy/k8s: every manifest valid against the Kubernetes schemas (kubernetes-validate bundles
them, strict: unknown fields fail), the GPU overlay too, and the pieces wired to each other, to
the image and to the settings."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from deploy_helpers import (
    DEPLOY,
    DOCKERFILES,
    ROOT,
    dockerfile_instructions,
    load_yaml,
    load_yaml_all,
    repository_path,
    stages,
)

from hmt_core.backbones import CACHE_ENV
from service.settings import Settings

K8S = DEPLOY / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
OLDEST = "1.29"  # the oldest Kubernetes minor the manifests must fit: a newer field would fail there

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate; CI installs it")


def base_documents() -> list[dict[str, Any]]:
    return [doc for name in load_yaml(BASE / "kustomization.yaml")["resources"] for doc in load_yaml_all(BASE / name)]


def find(kind: str, name: str, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (doc,) = [d for d in documents or base_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kustomize's strategic merge, as far as the overlays use it: maps merge, lists of named
    items (containers, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                  for i in base + patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def gpu_deployment() -> dict[str, Any]:
    overlay = load_yaml(GPU / "kustomization.yaml")
    assert overlay["resources"] == ["../../base"]
    (patch_ref,) = overlay["patches"]
    patch = load_yaml(GPU / patch_ref["path"])
    target = patch_ref["target"]
    assert (target["kind"], target["name"]) == (patch["kind"], patch["metadata"]["name"])
    assert f"{target['group']}/{target['version']}" == patch["apiVersion"]
    return strategic_merge(copy.deepcopy(find(target["kind"], target["name"])), patch)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(BASE / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


@pytest.mark.parametrize("version", [OLDEST, kv.latest_version()])
def test_manifests_match_the_schemas(version: str) -> None:
    documents = [*base_documents(), gpu_deployment()]
    for doc in documents:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}") from None
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet",
            "ConfigMap"} <= kinds


def test_service_monitor_for_the_operator() -> None:
    """The ServiceMonitor is a CRD of the Prometheus Operator, whose schema the stock Kubernetes
    schemas do not include: it is checked by structure (and kept out of the base kustomization)."""
    (monitor,) = load_yaml_all(K8S / "extras" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = find("Service", "hmt-serve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "hmt"} in endpoint["relabelings"]  # what the alerts select


def test_deployment() -> None:
    deployment = find("Deployment", "hmt-serve")
    spec, pod = deployment["spec"], deployment["spec"]["template"]
    main = container(deployment)
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    # the scrape annotations point at the container's port
    annotations = pod["metadata"]["annotations"]
    (port,) = main["ports"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    # the same numeric user as the images
    for dockerfile in DOCKERFILES:
        steps = dockerfile_instructions(dockerfile)
        uid = [a.split("=", 1)[1] for k, a in steps if k == "ARG" and a.startswith("UID=")]
        assert uid[-1] == str(pod["spec"]["securityContext"]["runAsUser"])
    # read-only root: the writable paths are volumes
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert main["securityContext"]["readOnlyRootFilesystem"] and {"/tmp", "/home/hmt/.cache"} <= mounts


def test_model_and_backbone_come_from_the_image() -> None:
    """The ConfigMap serves the model the images bake in; the baked backbone cache (read-only, as
    loading only reads it) is neither redirected elsewhere nor hidden under a volume."""
    for deployment in (find("Deployment", "hmt-serve"), gpu_deployment()):
        main = container(deployment)
        config = find("ConfigMap", main["envFrom"][0]["configMapRef"]["name"])["data"]
        assert CACHE_ENV not in config and CACHE_ENV not in {e["name"] for e in main["env"]}
        for dockerfile in DOCKERFILES:
            assert repository_path(dockerfile, config["HMT_MODEL"]) == ROOT / "models" / "hmt-smollm2"
            runtime = stages(dockerfile)[-1][1]
            cache = [p.split("=", 1)[1] for k, a in runtime if k == "ENV" for p in a.split()
                     if p.startswith(CACHE_ENV + "=")]
            assert cache == ["/opt/hmt-cache"]
            for mount in main["volumeMounts"]:
                for baked in (cache[0], config["HMT_MODEL"]):
                    assert not (baked + "/").startswith(mount["mountPath"].rstrip("/") + "/"), \
                        f"{mount['mountPath']} hides {baked}"


def test_settings_and_redis_wiring() -> None:
    deployment = find("Deployment", "hmt-serve")
    main = container(deployment)
    (source,) = main["envFrom"]
    config = find("ConfigMap", source["configMapRef"]["name"])["data"]
    fields = {f"HMT_{name.upper()}" for name in Settings.model_fields}
    names = set(config) | {e["name"] for e in main["env"]}
    assert names <= fields, f"unknown settings: {names - fields}"
    assert str(main["ports"][0]["containerPort"]) == config["HMT_PORT"] and config["HMT_HOST"] == "0.0.0.0"
    # Kubernetes' Docker-link variables (HMT_REDIS_PORT=tcp://…) must not reach pydantic-settings
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False

    redis_service = find("Service", "hmt-redis")
    host_port = config["HMT_REDIS_URL"].removeprefix("redis://").split("/")[0]
    assert host_port == f"{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}"
    redis = find("StatefulSet", "hmt-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and redis["spec"]["volumeClaimTemplates"]
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_service_hpa_pdb_select_the_deployment() -> None:
    deployment = find("Deployment", "hmt-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find("Service", "hmt-serve")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container(deployment)["ports"][0]["name"]
    hpa = find("HorizontalPodAutoscaler", "hmt-serve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hmt-serve"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = find("PodDisruptionBudget", "hmt-serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gpu_overlay() -> None:
    main = container(gpu_deployment())
    assert main["image"] == "hmt-serve:cuda"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "HMT_DEVICE", "value": "cuda"} in main["env"]
    # the base's probes and optional secrets survive the merge
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {e["name"] for e in main["env"]} >= {"HMT_API_KEYS", "HMT_REDIS_URL", "HMT_DEVICE"}


def test_every_yaml_under_k8s_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert all(isinstance(doc, dict) for doc in load_yaml_all(path)), path
    assert not list(K8S.rglob("*.yml")), "one extension for the manifests"
