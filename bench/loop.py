"""The learning benchmark: does the assistant move toward what its users prefer, and how fast?

    python -m bench.loop [--runs ppo:vader:0 ppo:vader:1 ppo:concise:0 dpo:vader:0 kto:vader:0] [--budget-min 30]
                         [--generations 3] [--write]

Each run (algorithm:preference:seed) in turn: a fresh stack (`chatloop up`: embedded Redis, API, one worker,
beat) with the default settings except CHATLOOP_ALGORITHM, starting from the base policy, and the simulated
users of bench/users.py, each with an API key of their own, chatting on the train prompts and voting by a fixed
preference (VADER sentiment, "prefer warmer answers", or "concise"), until K adapter generations were promoted or
the time budget ran out. Nothing is triggered by hand: beat starts the runs, the offline checks and the users'
own A/B votes decide promotions, the API hot-swaps.

Then the stack is stopped, so that measuring steals no time from learning. The base and every promoted version
answer every held-out prompt (no simulated user ever sent one) `samples` times with the same seeds
(bench/loop_eval.py), so two policies compare as a paired difference with its standard error; a promoted version
more than two standard errors below its predecessor is a promoted regression. Every reward model a run trained is
judged against the preference itself on a fixed set of base answers to the held-out prompts (bench/reward_eval.py:
accuracy on pairs more than 0.2 apart, best-of-n by the reward model beside best-of-n by the preference). Results go
to bench/results/loop-<algorithm>-<preference>-s<seed>.json; --write also renders bench/RESULTS.md and the plots in
docs/ from every results file present (bench/loop_report.py).
"""

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from bench.loop_eval import evaluate_policies, paired_difference
from bench.preferences import load_prompts
from bench.reward_eval import base_answers, report, reward_scores
from bench.stack import Stack
from bench.users import UserConfig, UserStats, run_users
from common.precision import bf16_is_fast
from rlhf.config import EvalConfig
from rlhf.modeling import load_base
from rlhf.reward import RewardModel
from service.engine.model import resolve_base_model
from service.settings import Settings
from service.store import feedback_store, registry, runs
from service.store.api_keys import create_key
from workers.runs import arun

log = logging.getLogger("bench.loop")
RESULTS_DIR = Path(__file__).with_name("results")
POLL_S = 5.0
PEOPLE_PER_SEAT = 16  # API keys per simulated user, taken in turn (UserConfig.turns_per_person turns each)
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
    # A key per person: to the service each is a voter of its own, as people with their own accounts would be.
    # Each seat sees PEOPLE_PER_SEAT people in turn (users.turns_per_person turns each): 8 seats voting ~90 times a
    # minute together would otherwise be 8 voters casting ~340 votes each in 30 minutes, and the A/B test's cap on
    # one voter's votes (CHATLOOP_AB_MAX_VOTES_PER_VOTER) would stop every test at 8 x the cap.
    keys = [(await create_key(redis, "user", f"sim-{i}"))[0] for i in range(users.concurrency * PEOPLE_PER_SEAT)]
    sync_redis = runs.client(Settings(redis_url=stack.redis_url))
    stop, stats_box = asyncio.Event(), {}
    started, wall_start = time.monotonic(), time.time()

    def on_event(stats: UserStats) -> None:
        stats_box["stats"] = stats

    population = asyncio.create_task(run_users(stack.url, prompts, users, stop=stop, on_event=on_event,
                                               api_key=keys))
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


def collect(stack: Stack, promoted: list[dict], dest: Path, wall_start: float
            ) -> tuple[dict[str, Path], list[dict], dict[str, Path]]:
    """Promoted adapters written out as peft directories, every run's record (relative times), and every run's
    reward model (by run id) written out as its directory."""
    settings = Settings(redis_url=stack.redis_url)
    adapters = {
        p["version"]: arun(settings, registry.export_dir, p["version"], dest / p["version"], raw=True)
        for p in promoted
    }
    records, reward_models = [], {}
    for run in reversed(runs.recent_runs(runs.client(settings), 100)):
        evaluation = run.get("evaluation") or {}
        records.append({
            "id": run.get("id"), "status": run.get("status"), "candidate": run.get("candidate"),
            "created_t": run["created"] - wall_start if run.get("created") else None,
            "finished_t": run["finished"] - wall_start if run.get("finished") else None,
            "events_seen": run.get("events_seen"), "reward_metrics": run.get("reward_metrics"),
            "policy": run.get("policy"), "gate_reasons": evaluation.get("reasons"),
            "gate_metrics": evaluation.get("metrics"), "ab": run.get("ab"), "error": run.get("error"),
        })
        if run.get("reward_metrics"):
            reward_models[run["id"]] = runs.get_dir(settings, run["id"], "reward", dest / f"rm-{run['id']}")
    return adapters, records, reward_models


@dataclass
class LoopConfig:
    work_dir: Path
    budget_s: float = 30 * 60
    generations: int = 3
    users: UserConfig = field(default_factory=UserConfig)
    eval_prompts: int = 0  # held-out prompts per policy (0: all of them)
    samples: int = 5  # answers per held-out prompt: 61 prompts x 5 = 305 answers per policy
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_answers: int = 16  # base answers per held-out prompt that each run's reward model is judged on (0: skip)
    env: dict[str, str] = field(default_factory=dict)  # more CHATLOOP_* for the stack (tests: a tiny setup)


def run_name(algorithm: str, preference: str, seed: int) -> str:
    return f"{algorithm}-{preference}-s{seed}"


def judge_reward_models(reward_models: dict[str, Path], records: list[dict], base_model: Path, config: LoopConfig,
                        heldout: list[str], preference: str) -> list[dict]:
    """Every run's reward model against the users' preference on a fixed set of base answers (bench/reward_eval)."""
    if not reward_models or not config.reward_answers:
        return []
    answers = base_answers(base_model, heldout, config.reward_answers,
                           config.work_dir / f"heldout-answers-{preference}.jsonl", preference,
                           config.eval.temperature, config.eval.max_new_tokens, seed=1)
    base, tokenizer = load_base(base_model)
    by_id = {r["id"]: r for r in records}
    judged = []
    for run_id, directory in reward_models.items():
        log.info("judging run %s's reward model on %d base answers", run_id, sum(map(len, answers.texts)))
        metrics = by_id[run_id].get("reward_metrics") or {}
        predicted = reward_scores(RewardModel.load(directory), base, tokenizer, answers)
        judged.append({
            "run_id": run_id, "t": by_id[run_id].get("created_t"), "events": by_id[run_id].get("events_seen"),
            "votes": metrics.get("reward/train_pairs", 0) + metrics.get("reward/train_thumbs", 0),
            "heldout_votes_accuracy": metrics.get("reward/heldout_accuracy"), **report(predicted, answers),
        })
    return judged


def regressions(policies: dict[str, dict], order: list[str]) -> list[dict]:
    """Each promoted version against its predecessor: the paired difference, its standard error, and whether it is
    a promoted regression (more than two standard errors below)."""
    out = []
    for previous, version in itertools.pairwise(order):
        diff, se = paired_difference(policies[version]["scores"], policies[previous]["scores"])
        out.append({"version": version, "previous": previous, "diff": diff, "se": se, "regression": diff < -2 * se})
    return out


def run_variant(algorithm: str, preference: str, seed: int, config: LoopConfig, base_model: Path) -> dict:
    name = run_name(algorithm, preference, seed)
    work = config.work_dir / name
    shutil.rmtree(work, ignore_errors=True)
    users = replace(config.users, preference=preference, seed=seed)
    stack = Stack(work, base_model, STACK_ENV | config.env | {"CHATLOOP_ALGORITHM": algorithm})
    log.info("%s: starting the stack (log: %s)", name, stack.log_path)
    load_start = os.getloadavg()  # what else ran on these cores skews every figure
    stack.start()
    try:
        learned = asyncio.run(learn(stack, load_prompts(split="train"), users, config.budget_s, config.generations))
        adapters, records, reward_models = collect(stack, learned["promotions"], work / "adapters",
                                                   learned["wall_start"])
    finally:
        stack.stop()
    log.info("%s: %d generation(s) promoted in %.0f s; evaluating on held-out prompts", name, len(adapters),
             learned["elapsed_s"])
    heldout = load_prompts(split="heldout")
    heldout = heldout[: config.eval_prompts] if config.eval_prompts else heldout
    started = time.monotonic()
    policies = evaluate_policies(base_model, adapters, heldout, preference, config.samples, config.eval)
    by_version = {r["candidate"]: r for r in records if r.get("candidate")}
    for promotion in learned["promotions"]:
        run = by_version.get(promotion["version"], {})
        policies[promotion["version"]] |= {
            "t": promotion["t"], "events": run.get("events_seen"),
            "rm_accuracy": (run.get("reward_metrics") or {}).get("reward/heldout_accuracy"),
        }
    policies["base"] |= {"t": 0.0, "events": 0, "rm_accuracy": None}
    eval_seconds = time.monotonic() - started
    return {
        "name": name, "algorithm": algorithm, "preference": preference, "seed": seed,
        "budget_s": config.budget_s, "generations": config.generations,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cores": os.cpu_count(),
        "native_bf16": bf16_is_fast("cpu"),  # what CHATLOOP_TRAIN_PRECISION=auto trains in, here
        "settings": Settings().model_dump(mode="json", exclude={"redis_url", "data_dir", "base_model", "port"}),
        "stack_env": config.env, "users_config": asdict(users), "heldout_prompts": len(heldout),
        "samples": config.samples, "reward_answers": config.reward_answers, "eval_seconds": eval_seconds,
        "load": {"start": load_start, "end": os.getloadavg()}, **learned, "runs": records, "policies": policies,
        "promoted_steps": regressions(policies, ["base", *(p["version"] for p in learned["promotions"])]),
        "reward_models": judge_reward_models(reward_models, records, base_model, config, heldout, preference),
    }


DEFAULT_RUNS = ["ppo:vader:0", "ppo:vader:1", "ppo:concise:0", "dpo:vader:0", "kto:vader:0"]


def parse_run(text: str) -> tuple[str, str, int]:
    parts = text.split(":")
    algorithm, preference, seed = [*parts, *["vader", "0"][len(parts) - 1 :]][:3]
    if algorithm not in ("ppo", "dpo", "kto") or preference not in ("vader", "concise") or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected algorithm:preference:seed, e.g. ppo:vader:0")
    return algorithm, preference, int(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                        help="algorithm:preference:seed, e.g. ppo:vader:0 (default: %(default)s)")
    parser.add_argument("--budget-min", type=float, default=30, help="learning time per run")
    parser.add_argument("--generations", type=int, default=3, help="stop after this many promotions")
    parser.add_argument("--users", type=int, default=8, help="simulated users talking at once")
    parser.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a user's turns")
    parser.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts per policy (0: all)")
    parser.add_argument("--samples", type=int, default=5, help="answers per held-out prompt")
    parser.add_argument("--work-dir", type=Path, default=Settings().data_dir / "bench-loop")
    parser.add_argument("--write", action="store_true", help="render bench/RESULTS.md and the plots in docs/")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the stack too (run_variant's finally)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    base_model = resolve_base_model(Settings())
    config = LoopConfig(
        work_dir=args.work_dir, budget_s=args.budget_min * 60, generations=args.generations,
        users=UserConfig(concurrency=args.users, think_time_s=args.think_time),
        eval_prompts=args.eval_prompts, samples=args.samples,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    for algorithm, preference, seed in args.runs:
        result = run_variant(algorithm, preference, seed, config, base_model)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)  # again: an hour of results must not die on a removed folder
        path = RESULTS_DIR / f"loop-{result['name']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)
        base = result["policies"]["base"]["score"]
        for name, p in result["policies"].items():
            log.info("%s %-6s score %.3f (%+.3f)  KL %.2f  length %.1f  EOS %.2f", result["name"], name, p["score"],
                     p["score"] - base, p["kl"], p["length"], p["eos"])
    if args.write:
        from bench.loop_report import write_report

        write_report(RESULTS_DIR, " ".join(["python -m bench.loop", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
