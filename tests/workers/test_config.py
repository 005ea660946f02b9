"""One source of defaults: the settings take the training knobs' defaults from rlhf/config.py, and map back onto
exactly those fields."""

from dataclasses import fields

import pytest

from rlhf.config import LoraSettings, PipelineConfig
from service.settings import Settings
from workers.config import SECTIONS, config_from_settings

# Settings of the workers' training windows, not of a training dataclass.
WORKER_ONLY = {"train_max_records_per_voter"}


def test_default_settings_give_the_default_pipeline():
    assert config_from_settings(Settings()) == PipelineConfig()


def test_every_training_setting_names_a_field():
    sections = {name: {f.name for f in fields(getattr(PipelineConfig(), name))} for name in SECTIONS}
    sections["lora"] = {f.name for f in fields(LoraSettings)}
    orphans = [
        name for name in Settings.model_fields
        if (section := name.split("_", 1)[0]) in sections and name not in WORKER_ONLY
        and name.split("_", 1)[1] not in sections[section]
    ]
    assert orphans == []


@pytest.mark.parametrize(
    ("env", "value", "where"),
    [
        ({"CHATLOOP_PPO_LR": "0.25"}, 0.25, lambda c: c.ppo.lr),
        ({"CHATLOOP_REWARD_ENSEMBLE": "5"}, 5, lambda c: c.reward.ensemble),
        ({"CHATLOOP_GATE_MAX_KL": "3"}, 3.0, lambda c: c.gate.max_kl),
        ({"CHATLOOP_TRAIN_WINDOW": "7"}, 7, lambda c: c.train_window),
        ({"CHATLOOP_LORA_R": "4"}, 4, lambda c: (c.reward.lora.r, c.ppo.lora.r, c.offline.lora.r)),
        ({"CHATLOOP_TRAIN_PRECISION": "fp32"}, "fp32", lambda c: {c.reward.precision, c.ppo.precision,
                                                                  c.offline.precision, c.eval.precision}),
        ({"CHATLOOP_PPO_MAX_NEW_TOKENS": "9"}, 9, lambda c: (c.ppo.max_new_tokens, c.eval.max_new_tokens)),
        ({"CHATLOOP_ALGORITHM": "kto"}, "kto", lambda c: (c.algorithm, c.offline.algorithm)),
        ({"CHATLOOP_DEVICE": "cpu"}, "cpu", lambda c: c.device),
    ],
)
def test_a_setting_reaches_its_field(monkeypatch, env, value, where):
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    got = where(config_from_settings(Settings()))
    expected = {value} if isinstance(got, set) else tuple([value] * len(got)) if isinstance(got, tuple) else value
    assert got == expected
