"""The `chatloop` command."""

import argparse
import asyncio
import json
from functools import partial
from pathlib import Path

from redis.asyncio import Redis

from service.cli.train import add_commands as add_training_commands
from service.cli.train import start_run
from service.settings import Settings, get_settings


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.app import create_app
    from service.api.logs import configure as configure_logs

    settings = get_settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    configure_logs(settings.log_level)
    print(f"chatloop: serving on http://{host}:{port}/v1 (model 'chatloop')", flush=True)
    # log_config=None: uvicorn's own loggers go through the JSON handler too
    app = create_app(settings, partial(start_run, settings))
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level, log_config=None)


def with_redis(command):
    """Run an async command with a Redis client from the settings."""

    def run(args: argparse.Namespace) -> None:
        async def main() -> None:
            redis = Redis.from_url(get_settings().redis_url, decode_responses=True)
            try:
                await command(args, redis)
            finally:
                await redis.aclose()

        asyncio.run(main())

    return run


@with_redis
async def keys_create(args: argparse.Namespace, redis: Redis) -> None:
    from service.store.api_keys import create_key

    key, key_id = await create_key(redis, args.role, args.name)
    print(f"created {args.role} key {key_id}; it is shown only once:\n{key}")


@with_redis
async def keys_list(args: argparse.Namespace, redis: Redis) -> None:
    from service.store.api_keys import list_keys

    for record in await list_keys(redis):
        print(f"{record['id']}  {record['role']:<5}  {record['name']}")


@with_redis
async def keys_revoke(args: argparse.Namespace, redis: Redis) -> None:
    from service.store.api_keys import revoke_key

    if not await revoke_key(redis, args.key_id):
        raise SystemExit(f"no key with id {args.key_id}")
    print(f"revoked {args.key_id}")


@with_redis
async def feedback_export(args: argparse.Namespace, redis: Redis) -> None:
    from tqdm import tqdm

    from service.store.export import export_feedback

    counts = await export_feedback(redis, args.out, args.kind, partial(tqdm, desc="export", unit="record"))
    print(f"exported {counts['pairs']} pairs and {counts['thumbs']} thumbs to {args.out} "
          f"({counts['votes']} current votes of {counts['events']} events)")


@with_redis
async def feedback_import(args: argparse.Namespace, redis: Redis) -> None:
    from tqdm import tqdm

    from common.records import MalformedFeedback
    from service.store.export import import_feedback

    try:
        counts = await import_feedback(
            redis, args.path, get_settings().completion_ttl_s, partial(tqdm, desc="import", unit="record")
        )
    except MalformedFeedback as exc:
        raise SystemExit(f"nothing imported: {exc}") from None
    print(f"imported {counts['pairs']} pairs and {counts['thumbs']} thumbs from {args.path}: "
          f"{counts['recorded']} recorded, {counts['replaced']} replaced, {counts['unchanged']} already there")


def check_adapter(path: Path, settings: Settings) -> None:
    """Refuse (SystemExit) an adapter directory that replicas could not merge into the base model: every replica
    would fail to load it once promoted."""
    from safetensors import SafetensorError

    from service.engine.lora import AdapterError, LoraAdapter, validate
    from service.engine.model import load_base_model

    base = load_base_model(settings)
    try:
        validate(LoraAdapter.from_dir(path), base.master_linear)
    except (AdapterError, SafetensorError) as exc:
        raise SystemExit(f"not imported: {path} does not fit the base model {base.name}: {exc}") from None


@with_redis
async def adapters_import(args: argparse.Namespace, redis: Redis) -> None:
    from service.store import registry

    await asyncio.to_thread(check_adapter, Path(args.path), get_settings())
    version = await registry.register_dir(redis, Path(args.path), {"source": str(args.path)}, args.version)
    print(f"registered {args.path} as {version}")
    if args.promote:
        await promote_version(redis, version, "imported")


async def promote_version(redis: Redis, version: str, reason: str) -> None:
    from service.store import registry

    try:
        previous = await registry.promote(redis, version, reason=reason)
    except registry.RegistryError as exc:
        raise SystemExit(f"not promoted: {exc}") from None
    print(f"promoted {version} (was {previous})")


@with_redis
async def adapters_list(args: argparse.Namespace, redis: Redis) -> None:
    from service.store import registry

    production = await registry.production(redis)
    for version in await registry.versions(redis):
        meta = await registry.metadata(redis, version) or {}
        marker = "*" if version == production else " "
        print(f"{marker} {version}  parent={meta.get('parent', '-')}  {json.dumps(meta.get('metrics', {}))[:80]}")
    print(f"production: {production}")


@with_redis
async def adapters_promote(args: argparse.Namespace, redis: Redis) -> None:
    await promote_version(redis, args.version, "manual")


@with_redis
async def adapters_rollback(args: argparse.Namespace, redis: Redis) -> None:
    from service.store import registry

    try:
        print(f"rolled back to {await registry.rollback(redis)}")
    except registry.RegistryError as exc:
        raise SystemExit(f"not rolled back: {exc}") from None


def up(args: argparse.Namespace) -> None:
    from service.cli.launcher import up as launch

    raise SystemExit(launch(get_settings()))


def worker(args: argparse.Namespace) -> None:
    from workers.celery_app import app

    settings = get_settings()
    (settings.data_dir / "work").mkdir(parents=True, exist_ok=True)
    # prefork, one task at a time, a fresh child per task: see workers/celery_app.py
    app.worker_main(["worker", "--loglevel", settings.log_level.upper(), "--pool", "prefork", "--concurrency", "1",
                     "--hostname", args.name])


def beat(args: argparse.Namespace) -> None:
    """Beat, and a worker in the same process that runs only beat's own check (the CONTROL queue): deciding an
    A/B test or starting a run never waits behind a training stage. The check imports no torch."""
    from workers.celery_app import CONTROL, app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(settings.data_dir / "celerybeat-schedule")
    app.worker_main(["worker", "--beat", "--schedule", schedule, "--queues", CONTROL, "--pool", "solo",
                     "--loglevel", settings.log_level.upper(), "--hostname", f"{CONTROL}@%h"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatloop", description="A chat assistant that learns from feedback.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="start the OpenAI-compatible API")
    p.add_argument("--host", help="bind address (default: CHATLOOP_HOST)")
    p.add_argument("--port", type=int, help="port (default: CHATLOOP_PORT)")
    p.set_defaults(func=serve)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create a key (printed once)")
    p.add_argument("--role", choices=["user", "admin"], default="user")
    p.add_argument("--name", default="", help="who the key is for")
    p.set_defaults(func=keys_create)
    keys.add_parser("list", help="list keys (ids, roles, names)").set_defaults(func=keys_list)
    p = keys.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    p.set_defaults(func=keys_revoke)

    feedback = commands.add_parser("feedback", help="feedback as training data").add_subparsers(
        dest="feedback_command", required=True
    )
    p = feedback.add_parser("export", help="write the current votes as JSONL (TRL conversational pairs and thumbs)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--kind", choices=["all", "pairs", "thumbs"], default="all")
    p.set_defaults(func=feedback_export)
    p = feedback.add_parser("import", help="record the pairs and thumbs of a JSONL file as feedback")
    p.add_argument("path", type=Path)
    p.set_defaults(func=feedback_import)
    adapters = commands.add_parser("adapters", help="the adapter registry").add_subparsers(
        dest="adapters_command", required=True
    )
    p = adapters.add_parser("import", help="check a peft adapter directory against the base model, then register "
                            "it as a new version")
    p.add_argument("path")
    p.add_argument("--version", help="version name (default: the next v000N)")
    p.add_argument("--promote", action="store_true", help="also make it production")
    p.set_defaults(func=adapters_import)
    adapters.add_parser("list", help="versions, their metrics, and production").set_defaults(func=adapters_list)
    p = adapters.add_parser("promote", help="make a version production on every replica")
    p.add_argument("version")
    p.set_defaults(func=adapters_promote)
    adapters.add_parser("rollback", help="return to the previous production version").set_defaults(
        func=adapters_rollback
    )

    commands.add_parser("up", help="run everything on this machine: Redis, API, worker, beat").set_defaults(func=up)

    p = commands.add_parser("worker", help="start a Celery worker (runs training stages)")
    p.add_argument("--name", default="chatloop@%h", help="worker hostname")
    p.set_defaults(func=worker)
    commands.add_parser("beat", help="start Celery beat (checks for new feedback on a schedule)").set_defaults(
        func=beat
    )

    add_training_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
