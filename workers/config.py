"""The training pipeline as the settings configure it: CHATLOOP_<SECTION>_<FIELD> sets that field of the
section's dataclass in rlhf/config.py (reward_, ppo_, offline_, eval_, gate_, lora_; algorithm and
train_window are the pipeline's own). Settings take their defaults from those dataclasses, so
`config_from_settings(Settings())` is exactly `PipelineConfig()`.
"""

from dataclasses import fields, replace

from rlhf.config import LoraSettings, PipelineConfig
from service.settings import Settings

SECTIONS = ("reward", "ppo", "offline", "eval", "gate")


def _section(settings: Settings, prefix: str, current):
    """A copy of one config dataclass with every field the settings name (prefix + field name) taken from them."""
    named = [f.name for f in fields(current) if prefix + f.name in Settings.model_fields]
    return replace(current, **{name: getattr(settings, prefix + name) for name in named})


def config_from_settings(settings: Settings) -> PipelineConfig:
    """The pipeline as the service's settings (CHATLOOP_*) configure it: for the workers and the CLI alike."""
    config = _section(settings, "", PipelineConfig())
    for name in SECTIONS:
        setattr(config, name, _section(settings, f"{name}_", getattr(config, name)))
    # Knobs that several sections share: one LoRA shape, one training precision, the gate samples like PPO does.
    lora = _section(settings, "lora_", LoraSettings())
    lora.target_modules = tuple(lora.target_modules)
    for name in ("reward", "ppo", "offline"):
        getattr(config, name).lora = lora
    for name in ("reward", "ppo", "offline", "eval"):
        getattr(config, name).precision = settings.train_precision
    config.eval.max_new_tokens, config.eval.temperature = config.ppo.max_new_tokens, config.ppo.temperature
    if config.algorithm != "ppo":
        config.offline.algorithm = config.algorithm
    from service.engine.model import resolve_device  # torch: not imported where only beat's check runs

    config.device = str(resolve_device(settings.device))  # "auto": CUDA where there is one
    return config
