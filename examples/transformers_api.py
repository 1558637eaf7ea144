"""transformers-style API: SmolLM2 as sym_int4, streamed generate, save_low_bit, load_low_bit, generate again."""
import argparse
import tempfile

import torch
import transformers

from ipex_llm_tf import AutoModelForCausalLM
from ipex_llm_tf.devices import best_device
from ipex_llm_tf.gguf_import import find_default_gguf

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--prompt", default="What is the capital of France?")
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()
device = best_device()  # xpu, then cuda, then cpu

model, tokenizer = AutoModelForCausalLM.from_gguf(find_default_gguf(), low_bit="sym_int4")
model = model.to(device)
ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"].to(device)


def generate(m: torch.nn.Module, streamer: "transformers.TextStreamer | None" = None) -> str:
    """Greedy completion of the prompt."""
    with torch.inference_mode():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False, streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


print(f"streaming ({model.config.ipex_llm_tf['low_bit']} on {device}):")
first = generate(model, transformers.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
with tempfile.TemporaryDirectory() as tmp:
    model.save_low_bit(tmp, tokenizer=tokenizer)  # packed weights: no re-quantization when loading back
    reloaded = AutoModelForCausalLM.load_low_bit(tmp).to(device)
    second = generate(reloaded)
print(f"original: {first!r}\nreloaded: {second!r}\nidentical: {first == second}")
