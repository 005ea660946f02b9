"""`chatloop train now|reward|ppo` and `chatloop eval`: queue a run on the workers, or run the training stages
here, with progress bars."""

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from service.settings import Settings, get_settings


class Bar:
    """A tqdm bar per stage, fed by the pipeline's progress callback."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, stage: str, step: int, total: int, metrics: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=stage, unit="step")
        self.bar.update(step - self.bar.n)
        shown = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if isinstance(v, float) and "time/" not in k}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(shown.items())[:4]})
        if step == total:
            self.bar.close()


def print_metrics(metrics: dict) -> None:
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def _config(args: argparse.Namespace):
    from workers.config import config_from_settings

    config = config_from_settings(get_settings())
    for name in ("epochs", "lr"):
        if getattr(args, name, None) is not None:
            setattr(config.reward, name, getattr(args, name))
    if getattr(args, "iterations", None) is not None:
        config.ppo.iterations = args.iterations
    return config


def _base_path() -> Path:
    from service.engine.model import resolve_base_model

    return resolve_base_model(get_settings())


def _out(args: argparse.Namespace, kind: str) -> Path:

    return Path(args.out) if args.out else get_settings().data_dir / kind / time.strftime("%Y%m%d-%H%M%S")


def train_reward(args: argparse.Namespace) -> None:
    from rlhf import pipeline  # torch and transformers load only for the commands that need them

    out = _out(args, "reward_models")
    metrics = pipeline.train_reward(Path(args.data), _base_path(), out, _config(args), Bar())
    print(f"reward model saved to {out}")
    print_metrics(metrics)


def train_ppo(args: argparse.Namespace) -> None:
    from rlhf import pipeline  # torch and transformers load only for the commands that need them

    out = _out(args, "candidates")
    data = Path(args.data) if args.data else None
    init = Path(args.init_adapter) if args.init_adapter else None
    history = pipeline.train_policy(Path(args.reward_model), _base_path(), out, _config(args), init, data, Bar())
    print(f"candidate adapter saved to {out}")
    print_metrics(history[-1])


def evaluate(args: argparse.Namespace) -> None:
    from rlhf import pipeline  # torch and transformers load only for the commands that need them

    data = Path(args.data) if args.data else None
    current = Path(args.current) if args.current else None
    result = pipeline.evaluate_candidate(
        Path(args.candidate), Path(args.reward_model), _base_path(), _config(args), current, data
    )
    print_metrics(result["metrics"])
    verdict = "ACCEPT" if result["accepted"] else "REJECT: " + "; ".join(result["reasons"])
    print(verdict)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def start_run(settings: Settings, trigger: str) -> str | None:
    """Queue a training run on the workers (Celery loads on the first call, not at start)."""
    from workers.celery_app import app
    from workers.runs import start_pipeline

    return start_pipeline(app, settings, trigger)


def train_now(args: argparse.Namespace) -> None:
    run_id = start_run(get_settings(), trigger="cli")
    if run_id is None:
        raise SystemExit("a training run is already in progress")
    print(f"started training run {run_id}; follow it with GET /admin/tasks/{run_id}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train offline").add_subparsers(dest="train_command", required=True)
    p = train.add_parser("now", help="start the online pipeline now (needs a running worker)")
    p.set_defaults(func=train_now)

    p = train.add_parser("reward", help="train a reward model on exported feedback")
    p.add_argument("--data", required=True, help="JSONL from `chatloop feedback export`")
    p.add_argument("--out", help="output directory (default: DATA_DIR/reward_models/<time>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.set_defaults(func=train_reward)

    p = train.add_parser("ppo", help="run PPO on a fresh LoRA adapter against a reward model")
    p.add_argument("--reward-model", required=True, help="directory from `chatloop train reward`")
    p.add_argument("--data", help="feedback JSONL for the prompt pool (default: the reward model's)")
    p.add_argument("--init-adapter", help="adapter directory to start from (default: a fresh adapter)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--out", help="output directory (default: DATA_DIR/candidates/<time>)")
    p.set_defaults(func=train_ppo)

    p = commands.add_parser("eval", help="compare a candidate adapter with the current policy and gate it")
    p.add_argument("--candidate", required=True, help="candidate adapter directory")
    p.add_argument("--reward-model", required=True)
    p.add_argument("--current", help="current adapter directory (default: the base model)")
    p.add_argument("--data", help="feedback JSONL for held-out prompts (default: the reward model's)")
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=evaluate)
