"""The learning benchmark: does the assistant move toward what its users prefer, and how fast?

    python -m bench.loop [--algorithm ppo dpo kto] [--budget-min 30] [--generations 3] [--write]

For each algorithm in turn: a fresh stack (`chatloop up`: embedded Redis, API, one worker, beat) with the
default settings except CHATLOOP_ALGORITHM, starting from the base policy, and the simulated users of
bench/users.py chatting on the train prompts and voting by a fixed preference (default: VADER sentiment,
"prefer warmer answers"), until K adapter generations were promoted or the time budget ran out. Nothing
is triggered by hand: beat starts the runs, the gate decides promotions, the API hot-swaps.

Then the stack is stopped, so that measuring steals no time from learning, and the base and every
promoted version answer the held-out prompts (bench/loop_eval.py). Per algorithm the results go to
bench/results/loop-<algorithm>.json; --write also renders the table into bench/RESULTS.md and the plot
into docs/learning_curve.png from every results file present (bench/loop_report.py).
"""

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from bench.loop_eval import evaluate_policies
from bench.preferences import load_prompts
from bench.stack import Stack
from bench.users import UserConfig, UserStats, run_users
from rlhf.config import EvalConfig
from service.engine.model import resolve_base_model
from service.settings import Settings
from service.store import feedback_store, registry, runs
from workers.runs import arun

log = logging.getLogger("bench.loop")
RESULTS_DIR = Path(__file__).with_name("results")
POLL_S = 5.0
# Every simulated user calls from 127.0.0.1: per-address rate limits would throttle the whole population.
STACK_ENV = {"CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "0", "CHATLOOP_FEEDBACK_REQUESTS_PER_MINUTE": "0"}


async def snapshot(redis: Redis) -> dict:
    stats = await feedback_store.stats(redis)
    return {
        "events": stats.get("events", 0),
        "production": await registry.production(redis),
        "history": await registry.history(redis),
    }


def promotions(history: list[dict]) -> list[dict]:
    """Promotions oldest first (rollbacks excluded: the benchmark never rolls back)."""
    return [entry for entry in reversed(history) if not entry.get("rollback")]


async def learn(stack: Stack, prompts: list[str], users: UserConfig, budget_s: float, generations: int) -> dict:
    """Users chat and vote while the stack learns; returns the timeline, the promotions and the users' stats."""
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    sync_redis = runs.client(Settings(redis_url=stack.redis_url))
    stop, stats_box = asyncio.Event(), {}
    started, wall_start = time.monotonic(), time.time()

    def on_event(stats: UserStats) -> None:
        stats_box["stats"] = stats

    population = asyncio.create_task(run_users(stack.url, prompts, users, stop=stop, on_event=on_event))
    timeline, last_log = [], 0.0
    try:
        while True:
            await asyncio.sleep(POLL_S)
            elapsed = time.monotonic() - started
            snap = await snapshot(redis)
            stats = stats_box.get("stats")
            timeline.append({
                "t": elapsed, "events": snap["events"], "production": snap["production"],
                "live_score": stats.recent_score if stats and stats.recent else None,
            })
            done = len(promotions(snap["history"]))
            if elapsed - last_log >= 30:
                last_log = elapsed
                stage = next(iter(runs.recent_runs(sync_redis, 1)), {})
                log.info("%4.0f s  %d events  live score %s  production %s (%d promoted)  run: %s %s",
                         elapsed, snap["events"], _fmt(timeline[-1]["live_score"]), snap["production"], done,
                         stage.get("status", "-"), stage.get("stage") or "")
            if done >= generations or elapsed >= budget_s:
                break
            if not stack.alive():
                raise RuntimeError(f"the stack died; see {stack.log_path}")
            if population.done():
                population.result()  # users failed for good: raise it
                raise RuntimeError("the simulated users stopped")
    finally:
        stop.set()
        user_stats = await population if not population.cancelled() else None
        snap = await snapshot(redis)
        await redis.aclose()
    return {
        "elapsed_s": time.monotonic() - started,
        "wall_start": wall_start,
        "timeline": timeline,
        "promotions": [{**p, "t": p["at"] - wall_start} for p in promotions(snap["history"])],
        "users": user_stats.as_dict() if user_stats else None,
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def collect(stack: Stack, promoted: list[dict], dest: Path, wall_start: float) -> tuple[dict[str, Path], list[dict]]:
    """Promoted adapters written out as peft directories, and every run's record (relative times)."""
    settings = Settings(redis_url=stack.redis_url)
    adapters = {
        p["version"]: arun(settings, registry.export_dir, p["version"], dest / p["version"], raw=True)
        for p in promoted
    }
    records = []
    for run in reversed(runs.recent_runs(runs.client(settings), 100)):
        evaluation = run.get("evaluation") or {}
        records.append({
            "id": run.get("id"), "status": run.get("status"), "candidate": run.get("candidate"),
            "created_t": run["created"] - wall_start if run.get("created") else None,
            "finished_t": run["finished"] - wall_start if run.get("finished") else None,
            "events_seen": run.get("events_seen"), "reward_metrics": run.get("reward_metrics"),
            "policy": run.get("policy"), "gate_reasons": evaluation.get("reasons"),
            "gate_metrics": evaluation.get("metrics"), "error": run.get("error"),
        })
    return adapters, records


@dataclass
class LoopConfig:
    work_dir: Path
    budget_s: float = 30 * 60
    generations: int = 3
    users: UserConfig = field(default_factory=UserConfig)
    eval_prompts: int = 40
    samples: int = 2
    eval: EvalConfig = field(default_factory=EvalConfig)
    env: dict[str, str] = field(default_factory=dict)  # more CHATLOOP_* for the stack (tests: a tiny setup)


def run_algorithm(algorithm: str, config: LoopConfig, base_model: Path) -> dict:
    work = config.work_dir / algorithm
    shutil.rmtree(work, ignore_errors=True)
    stack = Stack(work, base_model, STACK_ENV | config.env | {"CHATLOOP_ALGORITHM": algorithm})
    log.info("%s: starting the stack (log: %s)", algorithm, stack.log_path)
    stack.start()
    try:
        learned = asyncio.run(learn(stack, load_prompts(split="train"), config.users, config.budget_s,
                                    config.generations))
        adapters, records = collect(stack, learned["promotions"], work / "adapters", learned["wall_start"])
    finally:
        stack.stop()
    log.info("%s: %d generation(s) promoted in %.0f s; evaluating on held-out prompts", algorithm,
             len(adapters), learned["elapsed_s"])
    heldout = load_prompts(split="heldout")[: config.eval_prompts]
    started = time.monotonic()
    policies = evaluate_policies(base_model, adapters, heldout, config.users.preference, config.samples,
                                 config.eval)
    by_version = {r["candidate"]: r for r in records if r.get("candidate")}
    for promotion in learned["promotions"]:
        run = by_version.get(promotion["version"], {})
        policies[promotion["version"]] |= {
            "t": promotion["t"], "events": run.get("events_seen"),
            "rm_accuracy": (run.get("reward_metrics") or {}).get("reward/heldout_accuracy"),
        }
    policies["base"] |= {"t": 0.0, "events": 0, "rm_accuracy": None}
    return {
        "algorithm": algorithm, "preference": config.users.preference, "seed": config.users.seed,
        "budget_s": config.budget_s, "generations": config.generations,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cores": os.cpu_count(),
        "settings": Settings().model_dump(mode="json", exclude={"redis_url", "data_dir", "base_model", "port"}),
        "stack_env": config.env, "users_config": asdict(config.users), "heldout_prompts": len(heldout),
        "samples": config.samples,
        "eval_seconds": time.monotonic() - started, **learned, "runs": records, "policies": policies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", nargs="+", default=["ppo"], choices=["ppo", "dpo", "kto"])
    parser.add_argument("--budget-min", type=float, default=30, help="learning time per algorithm")
    parser.add_argument("--generations", type=int, default=3, help="stop after this many promotions")
    parser.add_argument("--preference", default="vader", choices=["vader", "concise"])
    parser.add_argument("--users", type=int, default=8, help="simulated users talking at once")
    parser.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a user's turns")
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts per policy")
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Settings().data_dir / "bench-loop")
    parser.add_argument("--write", action="store_true", help="render bench/RESULTS.md and docs/learning_curve.png")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the stack too (run_algorithm's finally)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    base_model = resolve_base_model(Settings())
    config = LoopConfig(
        work_dir=args.work_dir, budget_s=args.budget_min * 60, generations=args.generations,
        users=UserConfig(preference=args.preference, concurrency=args.users, think_time_s=args.think_time,
                         seed=args.seed),
        eval_prompts=args.eval_prompts, samples=args.samples,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    for algorithm in args.algorithm:
        result = run_algorithm(algorithm, config, base_model)
        path = RESULTS_DIR / f"loop-{algorithm}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)
        base = result["policies"]["base"]["score"]
        for name, p in result["policies"].items():
            log.info("%s %-6s score %.3f (%+.3f)  KL %.2f  length %.1f  EOS %.2f", algorithm, name, p["score"],
                     p["score"] - base, p["kl"], p["length"], p["eos"])
    if args.write:
        from bench.loop_report import write_report

        write_report(RESULTS_DIR, " ".join(["python -m bench.loop", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
