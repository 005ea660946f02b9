"""Celery tasks: thin stages of a training run. Each takes a run id, checks the lock, calls rlhf/ and
records the result; every stage is idempotent (a redelivered stage that already finished returns)."""

import time
from pathlib import Path

from redis.asyncio import Redis

from common.models import BASE
from service.feedback.ab import ABRules, ABTest, Evidence, decide
from service.feedback.ab import outcomes as ab_outcomes
from service.settings import Settings, get_settings
from service.store import ab_tests, feedback_store, registry, runs
from service.store.export import export_feedback
from workers.celery_app import app
from workers.config import config_from_settings
from workers.runs import arun, mark_lost_runs, stage, start_pipeline

FEEDBACK = "feedback.jsonl"


def base_path(settings: Settings) -> Path:
    from service.engine.model import resolve_base_model

    return resolve_base_model(settings)


def reward_and_data(settings: Settings, run_id: str, work: Path) -> tuple[Path, Path]:
    """The reward model and the feedback file the run's first stage handed on, fetched into work/."""
    reward = runs.get_dir(settings, run_id, "reward", work / "rm")
    return reward, runs.get_dir(settings, run_id, "data", work / "data") / FEEDBACK


def adapter_dir(settings: Settings, version: str, dest: Path) -> Path | None:
    """A registry version written out as a peft directory; None for the base (no adapter)."""
    if version == BASE:
        return None
    return arun(settings, registry.export_dir, version, dest, raw=True)


def ab_rules(settings: Settings) -> ABRules:
    return ABRules(min_votes=settings.ab_min_votes, max_votes_per_voter=settings.ab_max_votes_per_voter,
                   confidence=settings.ab_confidence, futility=settings.ab_futility, hold=settings.ab_hold_win_rate)


async def ab_evidence(redis: Redis, test: ABTest, max_votes_per_voter: int) -> tuple[str, Evidence]:
    """(production now, the blind votes on the two versions' answers since the test started)."""
    events = [event for _, event in await feedback_store.all_events(redis, since=test.started)]
    return await registry.production(redis), ab_outcomes(events, test, max_votes_per_voter)


async def end_ab(redis: Redis, test: ABTest, promote: bool, reason: str) -> str | None:
    """End the test, then promote the candidate (only over the production it was tested against) or not.
    Returns the run's final status; None if the test had already ended or given way to a newer one: beat's check
    and a training worker's promote stage both settle tests, and ending the test first (atomically, for this
    candidate only) lets exactly one of them carry out a verdict."""
    if not await ab_tests.finish(redis, test.candidate):
        return None
    if not promote:
        return "rejected"
    try:
        await registry.promote(redis, test.candidate, f"run {test.run_id}: {reason}", expected=test.production)
    except registry.AlreadyProduction:  # promoted already (by hand, say)
        pass
    except registry.PromotionConflict:  # production moved while the test ran (a rollback, say)
        return "superseded"
    return "promoted"


def settle_ab(settings: Settings) -> dict | None:
    """Decide the running A/B test if its evidence (or its deadline) allows; None if no test runs (or another
    process ended it meanwhile)."""
    test = arun(settings, ab_tests.active)
    if test is None:
        return None
    production, votes = arun(settings, ab_evidence, test, settings.ab_max_votes_per_voter)
    rules = ab_rules(settings)
    interval = rules.interval(votes)  # one bootstrap: the verdict's and the run record's
    if production != test.production:
        verdict, cause, reason = "reject", "production changed", f"production changed to {production} during the test"
    else:
        verdict, cause, reason = decide(votes, test, time.time(), rules, interval)
    mean, lower, upper = interval
    evidence = {"votes": votes.votes, "win_rate": mean, "ci95": [lower, upper], "against": test.production,
                "cause": cause, "reason": reason, **votes.as_dict()}
    if verdict == "wait":
        runs.update_run(runs.client(settings), test.run_id, ab=evidence)
        return {"run_id": test.run_id, "status": "ab_test", **evidence}
    status = arun(settings, end_ab, test, verdict == "promote", reason)
    if status is None:  # settled elsewhere meanwhile
        return None
    runs.update_run(runs.client(settings), test.run_id, status=status, ab=evidence, finished=time.time())
    return {"run_id": test.run_id, "status": status, **evidence}


def backoff_s(recent: list[dict], settings: Settings, now: float) -> float:
    """Seconds to wait before the next run after consecutive failed runs (newest first in `recent`): the retrain
    interval doubled per failure, capped; 0 after a success or with no failure."""
    failures = 0
    for run in recent:
        if run.get("status") != "failed":
            break
        failures += 1
    if not failures:
        return 0.0
    delay = min(settings.retrain_every_s * 2**failures, settings.retrain_max_backoff_s)
    return max(0.0, recent[0].get("finished", recent[0].get("created", now)) + delay - now)


def enter_ab(settings: Settings, version: str, parent: str, run_id: str, queued: bool = False) -> str:
    """Put a candidate that passed the offline checks into the online A/B test against production (as a rule the
    version it was trained from); returns its run's status. There is one test at a time (and one training run).
    When a test is still undecided, the newer candidate (trained on more feedback, from data that ends later)
    takes its place unless the test leads (its win rate so far above `ab_hold_win_rate`): a leading test keeps
    its place, because starting over would throw its evidence away (in the learning benchmark, tests that led at
    0.55 after 200 votes gave way one after another and nothing was ever decided), and the newer candidate waits
    for its turn ("ab_waiting"); only the newest waits, and a waiting one that a newer candidate displaces ends
    "superseded", as does a test that gives way, with the evidence it had. A test the evidence can decide is
    decided first. A candidate whose parent is no longer production (a test promoted while it trained or waited)
    is tested against the new production: it learnt from more feedback than the test's winner did, and the users
    decide between the two. (In the learning benchmark a run that started during the first test trained for 17
    minutes and was thrown away at the end.) Only an operator's rollback to something else since (production
    neither the parent nor a version promoted after it) makes it "superseded": production was taken back on
    purpose. queued: the candidate comes from the waiting slot (start_waiting), which it leaves to its caller."""
    for _ in range(3):  # each retry follows a test that ended or was replaced between two reads
        running = arun(settings, ab_tests.active)
        if running is not None and running.candidate == version:  # a redelivered stage: its test runs already
            return "ab_test"
        ab = settle_ab(settings) if running is not None else None  # decided now, if its evidence allows
        production = arun(settings, registry.production)
        if not arun(settings, registry.promoted_since, parent, production):  # True when production is the parent
            return "superseded"
        undecided = ab is not None and ab["status"] == "ab_test"
        if undecided and ab_rules(settings).holds(ab["win_rate"]):
            displaced = arun(settings, ab_tests.wait, ab_tests.Waiting(version, parent, run_id))
            if displaced is not None:
                supersede(settings, displaced.run_id, f"superseded by {version} while it waited for the test of "
                                                      f"{running.candidate}")
            return "ab_waiting"
        test = ABTest(candidate=version, production=production, run_id=run_id, started=time.time(),
                      deadline=time.time() + settings.ab_deadline_s)
        if not undecided:
            started = arun(settings, ab_tests.start, test)
        elif started := arun(settings, ab_tests.replace, running.candidate, test):
            supersede(settings, running.run_id, f"superseded by {version} before the evidence decided", ab)
        if started:
            older = None if queued else arun(settings, ab_tests.waiting)  # (itself, for a redelivered stage)
            if older is not None and arun(settings, ab_tests.clear_waiting, older.candidate) and older != (
                    version, parent, run_id):
                supersede(settings, older.run_id,
                          f"superseded by {version}, trained later, while it waited for its turn")
            arun(settings, registry.announce, version)  # replicas merge it now: the promotion will be a flip
            return "ab_test"
    return "rejected"


def supersede(settings: Settings, run_id: str, reason: str, evidence: dict | None = None) -> None:
    """End a run whose candidate a newer one replaced, in its test (with the evidence it had) or while it waited
    for one (no votes)."""
    ab = {**(evidence or {"votes": 0}), "cause": "superseded", "reason": reason}
    runs.update_run(runs.client(settings), run_id, status="superseded", finished=time.time(), ab=ab)


def start_waiting(settings: Settings) -> str | None:
    """Start the test of the candidate waiting for its turn, once no test runs; its run's status, None if no
    candidate waits or a test still runs."""
    entry = arun(settings, ab_tests.waiting)
    if entry is None or arun(settings, ab_tests.active) is not None:
        return None
    status = enter_ab(settings, entry.candidate, entry.parent, entry.run_id, queued=True)
    if status != "ab_waiting" and arun(settings, ab_tests.clear_waiting, entry.candidate):
        runs.update_run(runs.client(settings), entry.run_id, status=status,
                        **({} if status == "ab_test" else {"finished": time.time()}))
    return status


@app.task(name="chatloop.maybe_retrain")
def maybe_retrain() -> dict:
    """Beat's check: decide the A/B test if one runs and can be decided, then start the waiting candidate's test
    if none runs; start a run when enough feedback arrived (also while a test runs: enter_ab says whether its
    candidate gives way to the next or the next waits)."""
    settings = get_settings()
    ab = settle_ab(settings)
    start_waiting(settings)  # the waiting candidate's turn, if the test just ended (or ended elsewhere)
    r = runs.client(settings)
    lost = mark_lost_runs(r)
    wait = backoff_s(runs.recent_runs(r), settings, time.time())
    if wait > 0:
        return {"run_id": None, "reason": f"the last run failed: waiting {wait:.0f} s more", "lost": lost, "ab": ab}
    new = arun(settings, feedback_store.stats).get("new_since_training", 0)
    if new < settings.min_new_feedback:
        return {"run_id": None, "reason": f"{new} new feedback events, {settings.min_new_feedback} needed", "ab": ab}
    run_id = start_pipeline(app, settings, trigger="schedule")
    return {"run_id": run_id, "reason": f"{new} new feedback events" if run_id else "a run is in progress", "ab": ab}


@app.task(bind=True, name="chatloop.train_reward")
def train_reward(self, run_id: str) -> str:
    from rlhf import pipeline

    settings = get_settings()
    with stage(self, settings, run_id, "reward") as s:
        if "reward_metrics" in s.run:
            return run_id
        events_seen = arun(settings, feedback_store.stats).get("events", 0)  # the "new since" mark, once done
        data = s.work / "data"
        config = config_from_settings(settings)
        # Only the training window travels to the next stages (and through Redis), never the whole history.
        export = arun(settings, export_feedback, data / FEEDBACK, "all", iter, config.train_window,
                      settings.train_max_records_per_voter)
        # The base's features of answers are kept between runs on this worker: each run computes only new ones.
        metrics = pipeline.train_reward(data / FEEDBACK, base_path(settings), s.work / "rm", config, s.progress,
                                        settings.data_dir / "cache")
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
                                        s.progress, init_version=parent)
        meta = {"parent": parent, "run_id": run_id, "algorithm": settings.algorithm,
                "reward_metrics": s.run["reward_metrics"], "policy": history[-1] if history else {}}
        version = arun(settings, registry.register_dir, s.work / "candidate", meta)
        untrained = pipeline.untrained_reason(settings.algorithm, history, config.gate.max_kl)
        s.update(candidate=version, parent=parent, algorithm=settings.algorithm, policy=meta["policy"],
                 **({"untrained": untrained} if untrained else {}))
    return run_id


@app.task(bind=True, name="chatloop.evaluate")
def evaluate(self, run_id: str) -> str:
    from rlhf import pipeline

    settings = get_settings()
    with stage(self, settings, run_id, "evaluate") as s:
        if "evaluation" in s.run:
            return run_id
        if s.run.get("untrained"):  # the candidate is its parent: no evaluation, no A/B test
            s.update(evaluation={"metrics": {}, "accepted": False, "reasons": [s.run["untrained"]]})
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
        elif settings.ab_share > 0:
            status = enter_ab(settings, version, s.run["parent"], run_id)
        else:
            try:
                arun(settings, registry.promote, version, f"run {run_id}: passed the offline gate", s.run["parent"])
                status = "promoted"
            except registry.AlreadyProduction:  # a redelivered stage: the first delivery promoted it
                status = "promoted"
            except registry.PromotionConflict:  # production moved while this run trained (an operator's rollback)
                status = "superseded"
        arun(settings, feedback_store.mark_trained, s.run["events_seen"])
        s.update(status=status, **({} if status in ("ab_test", "ab_waiting") else {"finished": time.time()}))
        runs.release_lock(s.redis, run_id)
    return run_id
