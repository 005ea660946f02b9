"""Names every deploy file shares (image, compose, Kubernetes): the settings and commands they use exist."""

import importlib
import importlib.util
import re
import shlex

import uvicorn

from service.cli import main as cli
from service.settings import Settings
from tests.deploy.files import (
    DEPLOY,
    ROOT,
    compose_raw,
    containers,
    dockerfile_assignments,
    k8s_documents,
    pyproject,
)
from tests.deploy.manifest_helpers import OTHER_ENV, parse_chatloop, settings_env_names


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
