"""The Celery app: Redis broker and result backend, JSON only, one task at a time per worker.

Pool: prefork with concurrency 1 and a fresh child per task (max_tasks_per_child=1). A training stage
is CPU- (or GPU-) bound and uses every core through torch's own threads, so running two at once on a
worker only makes both slower; a child per task returns all of a stage's memory to the system and
keeps torch out of the long-lived parent, which stays small and enforces the hard time limit by
killing the child (the solo pool cannot). acks_late + reject_on_worker_lost: a stage whose worker
dies is redelivered, and every stage is idempotent, so running it twice is safe.

Beat's check (maybe_retrain: settle the A/B test, start a run) goes to a queue of its own, CONTROL, which
the beat process consumes itself (`chatloop beat`). On the training workers' queue it would wait behind a
stage that takes minutes, and a won A/B test would wait that long for its promotion.
"""

from celery import Celery

from service.settings import Settings, get_settings

app = Celery("chatloop", include=["workers.tasks"])
CONTROL = "control"  # the queue of beat's check: see above


def configure(settings: Settings) -> Celery:
    visibility = settings.task_visibility_timeout_s or settings.task_time_limit_s + 300
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options={"visibility_timeout": visibility},
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        task_routes={"chatloop.maybe_retrain": {"queue": CONTROL}},
        beat_schedule={
            "maybe-retrain": {
                "task": "chatloop.maybe_retrain",
                "schedule": float(settings.retrain_every_s),
                # A check that waited behind a training stage is stale: drop it rather than pile them up.
                "options": {"expires": float(settings.retrain_every_s)},
            }
        },
    )
    return app


configure(get_settings())
