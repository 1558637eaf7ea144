"""One-line PyTorch API: optimize_model() on a plain transformers model, then save_low_bit / low_memory_init."""
import argparse
import tempfile

import torch
import transformers

from ipex_llm_tf.devices import best_device
from ipex_llm_tf.gguf_import import find_default_gguf, read_gguf
from ipex_llm_tf.optimize import load_low_bit, low_memory_init, optimize_model

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--max-new-tokens", type=int, default=32)
args, device = parser.parse_args(), best_device()

# A plain fp32 LlamaForCausalLM, built offline from the GGUF's dequantized weights (any HF model works the same).
gguf = read_gguf(find_default_gguf())
tokenizer = gguf.load_tokenizer()
model = transformers.AutoModelForCausalLM.from_config(gguf.config)
model.load_state_dict({t.hf_name: t.dequantize() for t in gguf.tensors}, strict=False)  # lm_head is tied to it
model = optimize_model(model, low_bit="sym_int4").to(device)  # the one line
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"].to(device)


def generate(m: torch.nn.Module) -> str:
    """Greedy completion of the prompt."""
    with torch.inference_mode():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


print(f"optimized: {generate(model)!r}")
with tempfile.TemporaryDirectory() as saved:
    model.save_low_bit(saved)
    with low_memory_init():  # parameters on the meta device: the full-precision model is never materialised
        empty = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(saved))
    print(f"reloaded:  {generate(load_low_bit(empty, saved).to(device))!r}")
