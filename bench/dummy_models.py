"""Model folders with random ("dummy") weights for benchmarks: only a config.json, which is all
vLLM needs with `load_format="dummy"` and `skip_tokenizer_init=True` (prompts as token ids)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Meta-Llama-3-8B's shape: the paper's 6B/13B class, 128 KiB of bf16 KV per token.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def write_llama3_8b(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B, indent=1))
    return folder


if __name__ == "__main__":
    print(write_llama3_8b(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama3-8b-dummy")))
