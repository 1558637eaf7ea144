"""Hugging Face Hub: push a low-bit SmolLM2 with model.push_to_hub(repo_id), then load it back by repo id."""
import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from ipex_llm_tf import AutoModelForCausalLM
from ipex_llm_tf.devices import best_device
from ipex_llm_tf.gguf_import import find_default_gguf

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--repo-id", default="your-name/SmolLM2-135M-Instruct-asym_int4", help="owner/name to push to")
parser.add_argument("--dry-run", action="store_true", help="save locally and list what would be uploaded")
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()

model, tokenizer = AutoModelForCausalLM.from_gguf(find_default_gguf())  # Q4_1 blocks kept as asym_int4
with tempfile.TemporaryDirectory() as tmp:
    if args.dry_run:  # exactly the folder push_to_hub would upload
        source = model.save_low_bit(Path(tmp) / "model", tokenizer=tokenizer)
        print(f"would upload to https://huggingface.co/{args.repo_id}:")
        for file in sorted(source.iterdir()):
            print(f"  {file.name:26} {file.stat().st_size:>13,} bytes")
    else:  # needs a token with write access: `hf auth login` or HF_TOKEN
        print(f"pushed: {model.push_to_hub(args.repo_id, tokenizer=tokenizer)}")
        source = args.repo_id  # load_low_bit downloads the snapshot (or finds it in the HF cache)
    reloaded = AutoModelForCausalLM.load_low_bit(source).to(best_device())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"].to(reloaded.device)
with torch.inference_mode():
    out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(f"loaded {source}: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
