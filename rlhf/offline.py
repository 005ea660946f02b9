"""Offline preference optimisation of the policy adapter with TRL: the alternatives to our PPO.

- DPO (Rafailov et al. 2023, "Direct Preference Optimization"): maximise
  log sigmoid(beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]), the Bradley-Terry
  likelihood of each pair under the reward beta * log(pi / ref) implied by the policy; no reward model.
- KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): push the implied
  reward of each desirable answer above, and of each undesirable one below, a KL(pi || ref) reference point;
  built for unpaired binary feedback such as our thumbs.

The reference is the raw base (adapter disabled), always: each round continues from the production adapter,
but the KL is measured to the one fixed reference, never to the previous round's adapter (which would let the
policy drift a full KL budget further every round; as in rlhf/ppo.py).

Data (training side of FeedbackData; the held-out side is for evaluation): DPO takes the preference pairs plus
the pairs thumbs form (every up-voted x every down-voted answer to the same prompt); KTO takes the thumbs as
(prompt, completion, label) plus each pair split into chosen -> True and rejected -> False.
"""

import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset
from peft import PeftConfig, PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from common.conversations import Messages, conversation_id
from common.precision import resolve_precision
from common.records import Pair, Thumb
from rlhf.config import OfflineConfig
from rlhf.data import FeedbackData
from rlhf.modeling import peft_config, save_adapter


def thumb_pairs(thumbs: list[Thumb]) -> list[Pair]:
    """Every up-voted answer x every down-voted answer to the same prompt, as a pair."""
    by_prompt: dict[str, tuple[list[Thumb], list[Thumb]]] = defaultdict(lambda: ([], []))
    for thumb in thumbs:
        by_prompt[conversation_id(thumb.prompt)][0 if thumb.label else 1].append(thumb)
    return [
        Pair(up.prompt, up.answer, down.answer)
        for ups, downs in by_prompt.values() for up in ups for down in downs if up.answer != down.answer
    ]


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def dpo_rows(data: FeedbackData) -> list[dict]:
    """TRL's conversational preference format, from the pairs and the pairs the thumbs form."""
    return [
        {"prompt": pair.prompt, "chosen": assistant(pair.chosen), "rejected": assistant(pair.rejected)}
        for pair in [*data.pairs, *thumb_pairs(data.thumbs)]
    ]


def kto_rows(data: FeedbackData, seed: int) -> list[dict]:
    """TRL's conversational unpaired format, shuffled: KTOTrainer samples sequentially and estimates its KL term
    from each row's neighbour in the batch, which must be an answer to another prompt (not its pair's twin)."""
    labelled = [(thumb.prompt, thumb.answer, thumb.label) for thumb in data.thumbs]
    for pair in data.pairs:
        labelled += [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
    random.Random(seed).shuffle(labelled)
    return [{"prompt": prompt, "completion": assistant(answer), "label": label} for prompt, answer, label in labelled]


def kto_weights(labels: list[bool]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) for imbalanced labels. The KTO paper (eq. 8) and TRL recommend
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]: upweight the rarer class
    to make it 1. Counts as TRL takes them (at least 1 each), so its range check agrees."""
    n_up = max(sum(labels), 1)
    n_down = max(len(labels) - n_up, 1)
    return max(1.0, n_down / n_up), max(1.0, n_up / n_down)


class ReportProgress(TrainerCallback):
    def __init__(self, progress: Callable[[int, int, dict], None]) -> None:
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.progress(state.global_step, state.max_steps, dict(logs or {}))


def policy_peft_config(config: OfflineConfig, init_adapter_dir: Path | None) -> PeftConfig:
    if init_adapter_dir is None:
        return peft_config(config.lora)
    loaded = PeftConfig.from_pretrained(init_adapter_dir)
    loaded.inference_mode = False  # saved adapters say True; TRL would then create a frozen one
    return loaded


def load_init_adapter(policy: PeftModel, init_adapter_dir: Path) -> None:
    """Copy a saved adapter's weights into the policy's "default" adapter (same config, so same shapes)."""
    result = set_peft_model_state_dict(policy, load_peft_weights(str(init_adapter_dir)))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{init_adapter_dir}: adapter does not fit the policy ({result.unexpected_keys or missing})")


def warmup_steps(config: OfflineConfig, rows: int) -> int:
    """config.warmup of the run's optimiser steps, rounded down. transformers rounds a fraction up, and the
    first warmup step has a learning rate of 0: a run of a single step (a handful of votes) then learnt nothing."""
    steps_per_epoch = math.ceil(rows / (config.batch_size * config.grad_accum))
    return int(config.warmup * steps_per_epoch * config.epochs)


def trainer_args(
    config: OfflineConfig, rows: list[dict], output_dir: str, quiet: bool, cpu: bool = True
) -> DPOConfig | KTOConfig:
    """TRL's arguments: on the CPU unless told otherwise, no checkpoints, no integrations, a log entry every step."""
    common = dict(
        output_dir=output_dir, learning_rate=config.lr, num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        warmup_steps=warmup_steps(config, len(rows)), beta=config.beta,
        max_length=config.max_prompt_tokens + config.max_answer_tokens,
        bf16=resolve_precision(config.precision, "cpu" if cpu else "cuda") == "bf16", seed=config.seed, use_cpu=cpu,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no", report_to="none", push_to_hub=False, dataloader_pin_memory=False, disable_tqdm=quiet,
    )
    if config.algorithm == "dpo":
        return DPOConfig(**common)
    desirable, undesirable = kto_weights([row["label"] for row in rows])
    return KTOConfig(**common, desirable_weight=desirable, undesirable_weight=undesirable)


def train_offline(
    base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: FeedbackData, config: OfflineConfig,
    init_adapter_dir: Path | None, out_dir: Path, progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """DPO or KTO on the policy adapter (a copy of init_adapter_dir's, or a fresh one), saved to out_dir.

    Wraps base_model in place with the adapter. Returns TRL's log history: one dict per step (loss,
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies for DPO, kl for KTO, ...) and a
    summary; progress(step, total_steps, log) gets each of them as it comes.

    The reference in TRL 1.16 is NOT the base when given a PeftModel and ref_model=None: DPOTrainer.__init__
    (trl/trainer/dpo_trainer.py, the `elif is_peft_model(model) and ref_model is None` branch) copies the
    adapter into a frozen "ref" adapter, and _compute_loss runs the reference under use_adapter(model, "ref"),
    so the reference would be the init adapter (KTOTrainer in kto_trainer.py does the same). Only for a plain
    model plus peft_config does TRL make the adapter itself, with no "ref" copy, and use
    use_adapter(model, None) = disable_adapter() (trl/trainer/utils.py): the raw base. So we take that path
    and copy the init adapter's weights into the new adapter before training starts.
    """
    if config.algorithm == "dpo":
        rows = dpo_rows(data)
        if not rows:
            raise ValueError("DPO needs preference pairs: no pairs, and no prompt with both an up- and a down-vote")
    else:
        rows = kto_rows(data, config.seed)
        if not rows:
            raise ValueError("KTO needs labelled answers: the feedback has no thumbs and no pairs")

    trainer_cls = DPOTrainer if config.algorithm == "dpo" else KTOTrainer
    with tempfile.TemporaryDirectory(prefix="chatloop-offline-") as scratch:
        trainer = trainer_cls(
            model=base_model, args=trainer_args(
                config, rows, scratch, quiet=progress is not None, cpu=base_model.device.type == "cpu"
            ),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=policy_peft_config(config, init_adapter_dir),
        )
        if progress is not None:  # progress() stands in for both the bar and the printed logs
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(ReportProgress(progress))
        if init_adapter_dir is not None:
            load_init_adapter(trainer.model, init_adapter_dir)
        trainer.train()
    save_adapter(trainer.model, out_dir)
    return trainer.state.log_history
