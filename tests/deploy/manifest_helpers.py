"""Constants and helpers the deploy-file tests share."""

import re
import shlex

import pytest
from packaging.version import Version
from pydantic import AliasChoices

from service.cli import main as cli
from service.settings import Settings
from tests.deploy.files import pyproject

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
    """The top-level packages `pip install .` installs (service, workers, rlhf, common)."""
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
