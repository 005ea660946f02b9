"""The Kubernetes manifests, checked without a cluster (kubernetes-validate's schemas, offline)."""

import re

import pytest
import yaml
from packaging.version import Version

from tests.deploy.files import (
    K8S,
    containers,
    dockerfile_instructions,
    k8s_documents,
    k8s_resource,
    pod_spec,
)
from tests.deploy.manifest_helpers import CHATLOOP_ROLES, DATA_DIR, OLDEST_KUBERNETES, parse_chatloop


def kubernetes_versions() -> list[str]:
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError:
        return []
    return sorted({v for v in all_versions() if Version(v) >= OLDEST_KUBERNETES}, key=Version)


@pytest.mark.parametrize("version", kubernetes_versions() or ["unavailable"])
def test_k8s_manifests_match_the_kubernetes_schemas(version: str):
    if version == "unavailable":
        pytest.skip("kubernetes-validate not installed (it bundles the Kubernetes JSON schemas)")
    import kubernetes_validate

    for file, doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file}: {doc['kind']}/{doc['metadata']['name']} against {version}: {exc}")


def test_kustomization_lists_every_manifest_and_the_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    image_names = {
        c["image"].split(":")[0]
        for _, d in k8s_documents()
        if "template" in d.get("spec", {})
        for c in containers(d)
        if not c["image"].startswith("redis")
    }
    assert image_names == {i["name"] for i in kustomization["images"]}


def test_k8s_roles_run_the_right_commands():
    for role, handler in CHATLOOP_ROLES.items():
        (container,) = containers(k8s_resource("Deployment", f"chatloop-{role}"))
        assert parse_chatloop(container["command"] + container.get("args", [])).__name__ == handler


def test_k8s_api_deployment_probes_resources_and_draining():
    api = k8s_resource("Deployment", "chatloop-api")
    assert api["spec"]["replicas"] == 2
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = pod_spec(api)
    (container,) = spec["containers"]
    port = int(container["command"][container["command"].index("--port") + 1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["http"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    service = k8s_resource("Service", "chatloop-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_beat_is_one_replica_recreated():
    beat = k8s_resource("Deployment", "chatloop-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


def test_k8s_worker_gpu_example_is_a_valid_gpu_worker_once_uncommented():
    """The commented GPU lines of worker.yaml, uncommented as its comment says, give a valid Deployment that asks
    for a GPU and lands on GPU nodes."""
    text = (K8S / "worker.yaml").read_text()
    example = re.compile(r"^(\s*)# ((?:nvidia\.com/gpu: 1|nodeSelector:|tolerations:)|\s+\S.*)$")
    lines, inside = [], False
    for line in text.splitlines():
        match = example.match(line)
        starts = match is not None and match.group(2) in ("nvidia.com/gpu: 1", "nodeSelector:", "tolerations:")
        inside = starts or (inside and match is not None)
        lines.append(match.group(1) + match.group(2) if inside and match else line)
    doc = yaml.safe_load("\n".join(lines))
    spec = doc["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    versions = kubernetes_versions()
    if versions:
        import kubernetes_validate

        kubernetes_validate.validate(doc, versions[-1], strict=True)


def test_k8s_redis_is_append_only_on_a_claim():
    redis = k8s_resource("StatefulSet", "redis")
    (container,) = containers(redis)
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert k8s_resource("Service", redis["spec"]["serviceName"])


def test_k8s_references_resolve():
    """Services select pods that exist, env sources exist, REDIS_URL names the Redis Service, pods run
    as the image's user."""
    docs = [d for _, d in k8s_documents()]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if "template" in d.get("spec", {})]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pods), f"Service {service['metadata']['name']}"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    image_uid = int([a for i, a in dockerfile_instructions() if i == "USER"][-1].split(":")[0])
    for role in CHATLOOP_ROLES:
        deployment = k8s_resource("Deployment", f"chatloop-{role}")
        assert pod_spec(deployment)["securityContext"]["runAsUser"] == image_uid
        for source in containers(deployment)[0]["envFrom"]:
            kind, ref = (
                ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
            )
            assert (kind, ref["name"]) in names
    url = k8s_resource("Secret", "chatloop-secrets")["stringData"]["REDIS_URL"]
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url).groups()
    redis_service = k8s_resource("Service", host)
    assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
    assert k8s_resource("ConfigMap", "chatloop-config")["data"]["CHATLOOP_DATA_DIR"] == DATA_DIR
