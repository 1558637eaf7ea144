"""Tiny randomly initialised transformers decoders for fast CPU tests of the fused forwards."""
from __future__ import annotations

import torch
import transformers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SLIDING_WINDOW = 8  # Mistral's window in these tests; prompts are made longer than it

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_config(arch: str, attn_implementation: str = "eager", **overrides: object) -> transformers.PretrainedConfig:
    """hidden 64, 2 layers, 4 query heads over 2 KV heads of dim 16, vocab 128, no EOS so generation runs its length."""
    config_cls, _ = _CLASSES[arch]
    kwargs: dict = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=256,
                        # large init so attention is far from uniform and any masking mistake shows in the logits
                        initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                        tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = SLIDING_WINDOW
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "eager", **overrides: object) -> torch.nn.Module:
    """A seeded tiny *ForCausalLM in eval mode; biases (Qwen2's q/k/v) get random values so merging them is tested."""
    _, model_cls = _CLASSES[arch]
    torch.manual_seed(seed)
    model = model_cls(tiny_config(arch, attn_implementation, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)  # non-unit norm weights, so a norm that drops its weight is caught
    return model


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-2, an architecture with no fused forward."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                     bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@torch.no_grad()
def step_logits(model: torch.nn.Module, ids: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    """Prefill ids[:, :chunks[0]], then feed the following chunks through the cache; the logits of each forward."""
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG  # the installed transformers' name for the cache
    out = model(input_ids=ids[:, :chunks[0]], use_cache=True)
    logits, cache, start = [out.logits], getattr(out, CACHE_KWARG), chunks[0]
    for size in chunks[1:]:
        out = model(input_ids=ids[:, start:start + size], use_cache=True, **{CACHE_KWARG: cache})
        logits.append(out.logits)
        cache, start = getattr(out, CACHE_KWARG), start + size
    return logits
