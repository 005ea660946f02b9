"""schemathesis over /openapi.json against a real server: every operation, every phase (examples, boundary
values, random and invalid bodies, and sequences that rate the completions they made), and no 5xx.

It runs as an admin, so the admin routes are exercised too (as anonymous they all end at a 403). Besides
"no server error", the custom checks in fuzz_checks.py hold the schema to the validation (a body the schema
allows is never refused as malformed) and a streamed 200 to its promise (it never ends in an error event).
The run is bounded (FUZZ_EXAMPLES per operation and phase) and seeded, so a failure can be replayed from
its report.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.server import running_server, tiny_server_env
from tests.service.api.keys import new_key

FUZZ_EXAMPLES = 20
SEED = 15
CHECKS = "not_a_server_error,schema_valid_body_passes_validation,streams_end_without_error"
# What a request that failed inside the server leaves in its log: errors.py's 500 handler, and uvicorn's report
# of an exception raised after the response started.
FAILURES_IN_LOG = ("unhandled error", "Exception in ASGI application")
REPO = Path(__file__).resolve().parents[3]


def schemathesis_run(url: str, key: str, workdir: Path) -> subprocess.CompletedProcess:
    config = workdir / "schemathesis.toml"
    config.write_text("max-stream-events = 100000\n")  # read every stream to its end (the default stops at 20)
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run", f"{url}/openapi.json",
        "--checks", CHECKS, "--max-examples", str(FUZZ_EXAMPLES), "--seed", str(SEED),
        "--generation-database", "none", "--header", f"Authorization: Bearer {key}", "--request-timeout", "60",
        "--no-color",
    ]
    hooks = {"SCHEMATHESIS_HOOKS": "tests.service.api.fuzz_checks", "PYTHONPATH": str(REPO)}
    # cwd: schemathesis keeps its own files (.schemathesis/) where it runs, which is not the checkout.
    return subprocess.run(command, cwd=workdir, env={**os.environ, **hooks}, capture_output=True, text=True,
                          timeout=600)


def test_fuzz_openapi_has_no_server_errors(tiny_model_dir, tmp_path, redis_url):
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url)
    with running_server(env, tmp_path / "server.log") as url:
        run = schemathesis_run(url, new_key(redis_url, "admin", "fuzz"), tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12_000:]
    # Every operation in the schema was tested: none filtered out or skipped for want of data.
    selected, total = map(int, re.search(r"Selected: (\d+)/(\d+)", report).groups())
    tested = int(re.search(r"Tested: (\d+)", report).group(1))
    assert tested == selected == total, report[-3000:]
    # A response that broke after its 200 went out is no 5xx, but it leaves its trace in the log.
    server_log = (tmp_path / "server.log").read_text()
    for failure in FAILURES_IN_LOG:
        assert failure not in server_log, server_log[-5000:]
