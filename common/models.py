"""Names and files every part agrees on for the model and its adapters."""

BASE = "base"  # the adapter name that means "no adapter": the base model itself
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's format: the LoRA shape
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's format: the LoRA weights (never pickle)
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the generation config's EOS ids (chat models list the end-of-turn
    token there) and the tokenizer's own."""
    config = getattr(model, "generation_config", None)
    ids = config.eos_token_id if config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids])
    return (ids | {tokenizer.eos_token_id}) - {None}
