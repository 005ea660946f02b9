"""Reading the deploy files the way their tools do, for the tests in this package."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
NGINX_CONF = DEPLOY / "nginx.conf"
K8S = DEPLOY / "k8s"


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def tool(name: str) -> str | None:
    """An executable on PATH or beside this Python (a venv's bin/, when it is not activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment lines dropped as Docker does."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_assignments(keyword: str) -> dict[str, str]:
    """The KEY=value pairs of every ENV (or ARG) instruction."""
    values = {}
    for instruction, args in dockerfile_instructions():
        if instruction == keyword:
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def dockerfile_runs() -> list[str]:
    """RUN commands with the ARG defaults substituted."""
    args = dockerfile_assignments("ARG")

    def expand(command: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), command)

    return [expand(a) for i, a in dockerfile_instructions() if i == "RUN"]


def exec_form(instruction: str) -> list[str]:
    """The JSON (exec) form of the last CMD or HEALTHCHECK ... CMD."""
    args = [a for i, a in dockerfile_instructions() if i == instruction][-1]
    return json.loads(args[args.index("[") :])


# Compose


@cache
def compose_raw() -> dict:
    """compose.yaml as YAML (merge keys resolved by the loader, ${VAR} interpolation not)."""
    return yaml.safe_load(COMPOSE.read_text())


def compose_cli() -> list[str] | None:
    """A Docker Compose that works here: the docker CLI plugin, or a standalone docker-compose."""
    candidates = []
    if docker := tool("docker"):
        candidates.append([docker, "compose"])
    if standalone := tool("docker-compose"):
        candidates.append([standalone])
    for command in candidates:
        if subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            return command
    return None


# Kubernetes


def k8s_documents() -> list[tuple[str, dict]]:
    """(file name, resource) for every resource in deploy/k8s, the kustomization excluded."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_resource(kind: str, name: str) -> dict:
    matches = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def containers(resource: dict) -> list[dict]:
    return pod_spec(resource)["containers"]
