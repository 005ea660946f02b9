"""Celery tasks: thin stages of a training run. Each takes a run id, checks the lock, calls rlhf/ and
records the result; every stage is idempotent (a redelivered stage that already finished returns)."""

import time
from pathlib import Path

from redis.asyncio import Redis

from common.models import BASE
from service.feedback.leaderboard import arena_outcomes, head_to_head
from service.settings import Settings, get_settings
from service.store import feedback_store, registry, runs
from service.store.export import export_feedback
from workers.celery_app import app
from workers.config import config_from_settings
from workers.runs import arun, stage, start_pipeline

FEEDBACK = "feedback.jsonl"


def base_path(settings: Settings) -> Path:
    from service.engine.model import resolve_base_model

    return resolve_base_model(settings)


def reward_and_data(settings: Settings, run_id: str, work: Path) -> tuple[Path, Path]:
    """The reward model and the feedback file the run's first stage handed on, fetched into work/."""
    reward = runs.get_dir(settings, run_id, "reward", work / "rm")
    return reward, runs.get_dir(settings, run_id, "data", work / "data") / FEEDBACK


def previous_reward_model(settings: Settings, run_id: str, dest: Path) -> Path | None:
    """The newest reward model another run trained (kept FILES_TTL_S), fetched into dest; None if there is none
    or CHATLOOP_REWARD_WARM_START is off."""
    if not settings.reward_warm_start:
        return None
    for run in runs.recent_runs(runs.client(settings)):
        if run["id"] != run_id and "reward_metrics" in run:
            try:
                return runs.get_dir(settings, run["id"], "reward", dest)
            except FileNotFoundError:  # expired
                return None
    return None


def adapter_dir(settings: Settings, version: str, dest: Path) -> Path | None:
    """A registry version written out as a peft directory; None for the base (no adapter)."""
    if version == BASE:
        return None
    return arun(settings, registry.export_dir, version, dest, raw=True)


async def arena_record(redis: Redis, candidate: str) -> tuple[str, int, float]:
    """(production, votes, candidate's win rate) in live comparisons of the candidate with production."""
    production = await registry.production(redis)
    events = [event for _, event in await feedback_store.all_events(redis)]
    return production, *head_to_head(arena_outcomes(events), candidate, production)


def settle_arena(settings: Settings) -> dict | None:
    """Promote or reject the candidate waiting in the arena once it has enough votes; None if none waits."""
    r = runs.client(settings)
    waiting = [run for run in runs.recent_runs(r) if run.get("status") == "awaiting_arena"]
    if not waiting:
        return None
    run = waiting[0]
    production, votes, win_rate = arun(settings, arena_record, run["candidate"])
    verdict = {"run_id": run["id"], "votes": votes, "win_rate": win_rate}
    if votes < settings.gate_arena_votes:
        return verdict | {"status": "awaiting_arena"}
    if win_rate >= settings.gate_arena_min_win_rate:
        arun(settings, registry.promote, run["candidate"], f"run {run['id']}: won the arena {win_rate:.2f}")
        status = "promoted"
    else:
        status = "rejected"
    runs.update_run(r, run["id"], status=status, arena={"votes": votes, "win_rate": win_rate, "against": production})
    return verdict | {"status": status}


@app.task(name="chatloop.maybe_retrain")
def maybe_retrain() -> dict:
    """Beat's check: settle a candidate waiting in the arena, else start a run when enough feedback arrived."""
    settings = get_settings()
    arena = settle_arena(settings)
    if arena is not None and arena["status"] == "awaiting_arena":
        return {"run_id": None, "reason": f"a candidate is in the arena ({arena['votes']} votes)", "arena": arena}
    new = arun(settings, feedback_store.stats).get("new_since_training", 0)
    if new < settings.min_new_feedback:
        return {"run_id": None, "reason": f"{new} new feedback events, {settings.min_new_feedback} needed"}
    run_id = start_pipeline(app, settings, trigger="schedule")
    return {"run_id": run_id, "reason": f"{new} new feedback events" if run_id else "a run is in progress"}


@app.task(bind=True, name="chatloop.train_reward")
def train_reward(self, run_id: str) -> str:
    from rlhf import pipeline

    settings = get_settings()
    with stage(self, settings, run_id, "reward") as s:
        if "reward_metrics" in s.run:
            return run_id
        events_seen = arun(settings, feedback_store.stats).get("events", 0)  # the "new since" mark, once done
        data = s.work / "data"
        export = arun(settings, export_feedback, data / FEEDBACK, "all")
        config = config_from_settings(settings)
        previous = previous_reward_model(settings, run_id, s.work / "previous_rm")
        metrics = pipeline.train_reward(data / FEEDBACK, base_path(settings), s.work / "rm", config, s.progress,
                                        previous)
        runs.put_dir(settings, run_id, "data", data)
        runs.put_dir(settings, run_id, "reward", s.work / "rm")
        s.update(reward_metrics=metrics, export=export, events_seen=events_seen)
    return run_id


@app.task(bind=True, name="chatloop.train_policy")
def train_policy(self, run_id: str) -> str:
    from rlhf import pipeline

    settings = get_settings()
    with stage(self, settings, run_id, "policy") as s:
        if "candidate" in s.run:
            return run_id
        reward, data = reward_and_data(settings, run_id, s.work)
        parent = arun(settings, registry.production)
        init = adapter_dir(settings, parent, s.work / "parent")
        config = config_from_settings(settings)
        history = pipeline.train_policy(reward, base_path(settings), s.work / "candidate", config, init, data,
                                        s.progress)
        meta = {"parent": parent, "run_id": run_id, "algorithm": settings.algorithm,
                "reward_metrics": s.run["reward_metrics"], "policy": history[-1] if history else {}}
        version = arun(settings, registry.register_dir, s.work / "candidate", meta)
        s.update(candidate=version, parent=parent, algorithm=settings.algorithm, policy=meta["policy"])
    return run_id


@app.task(bind=True, name="chatloop.evaluate")
def evaluate(self, run_id: str) -> str:
    from rlhf import pipeline

    settings = get_settings()
    with stage(self, settings, run_id, "evaluate") as s:
        if "evaluation" in s.run:
            return run_id
        reward, data = reward_and_data(settings, run_id, s.work)
        candidate = adapter_dir(settings, s.run["candidate"], s.work / "candidate")
        current = adapter_dir(settings, s.run["parent"], s.work / "current")
        config = config_from_settings(settings)
        result = pipeline.evaluate_candidate(candidate, reward, base_path(settings), config, current, data)
        s.update(evaluation=result)
    return run_id


@app.task(bind=True, name="chatloop.promote")
def promote(self, run_id: str) -> str:
    settings = get_settings()
    with stage(self, settings, run_id, "promote") as s:
        evaluation, version = s.run["evaluation"], s.run["candidate"]
        if not evaluation["accepted"]:
            status = "rejected"
        elif settings.gate_arena_votes:
            status = "awaiting_arena"  # served in the arena against production; beat settles it
        else:
            arun(settings, registry.promote, version, f"run {run_id}: passed the gate")
            status = "promoted"
        arun(settings, feedback_store.mark_trained, s.run["events_seen"])
        s.update(status=status, finished=time.time())
        runs.release_lock(s.redis, run_id)
    return run_id
