import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from service.engine.lora import AdapterError, LoraAdapter
from service.engine.model import load_base_model


def test_merged_adapter_matches_peft(tiny_settings, tiny_model_dir, tiny_adapter_dir):
    base = load_base_model(tiny_settings)
    served = base.with_adapter(LoraAdapter.from_dir(tiny_adapter_dir))
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected = reference(ids).logits
        got = served(ids).logits
        plain = base.model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-2)  # the adapter matters


def test_adapter_model_shares_untouched_tensors_with_base(tiny_settings, tiny_adapter_dir):
    base = load_base_model(tiny_settings)
    served = base.with_adapter(LoraAdapter.from_dir(tiny_adapter_dir))
    base_params = dict(base.model.named_parameters())
    for name, param in served.named_parameters():
        shared = param is base_params[name]
        assert shared == ("proj" not in name), name
    # The base model itself is unchanged.
    assert base.model.model.layers[0].self_attn.q_proj.weight is base_params["model.layers.0.self_attn.q_proj.weight"]


def _rewrite_config(src, dst, **changes):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text()) | changes
    (dst / "adapter_config.json").write_text(json.dumps(config))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("change", [{"use_dora": True}, {"peft_type": "IA3"}, {"modules_to_save": ["lm_head"]}])
def test_unsupported_adapters_are_refused(tiny_settings, tiny_adapter_dir, tmp_path, change):
    base = load_base_model(tiny_settings)
    bad = _rewrite_config(tiny_adapter_dir, tmp_path / "bad", **change)
    with pytest.raises(AdapterError):
        base.with_adapter(LoraAdapter.from_dir(bad))


def test_missing_adapter_files_are_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError):
        LoraAdapter.from_dir(tmp_path)
