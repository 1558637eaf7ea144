"""GGUF: load llama.cpp's Q4_1 SmolLM2 keeping its blocks as asym_int4 (lossless, no re-quantization), generate."""
import argparse
from collections import Counter

import torch

from ipex_llm_tf import AutoModelForCausalLM, LowBitLinear
from ipex_llm_tf.devices import best_device
from ipex_llm_tf.gguf_import import find_default_gguf

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--gguf", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
parser.add_argument("--prompt", default="Write a haiku about the sea.")
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()
device = best_device()

path = args.gguf or find_default_gguf()
model, tokenizer = AutoModelForCausalLM.from_gguf(path, low_bit=None)  # None: keep the file's own blocks
model = model.to(device)
formats = Counter(m.low_bit for m in model.modules() if isinstance(m, LowBitLinear))
print(f"{path}\nlow_bit: {model.config.ipex_llm_tf['low_bit']}; layers per format: {dict(formats)}")

ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"].to(device)
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
