"""Build a tiny Hugging Face MoE folder offline, to try ``moesaic.hf`` and ``moesaic train --hf`` without a download.

The model is a 2-layer model of one of the six families ``moesaic.hf`` converts, with random
weights, built from its ``transformers`` config class and written with ``save_pretrained``. The
folder also gets a tokenizer (``moesaic train --hf`` trains on text and needs one): a byte-level BPE
trained here on some of the Python standard library's sources, so any text can be tokenized.

    python examples/tiny_hf_model.py runs/tiny-mixtral [--family mixtral]
    moesaic train --hf runs/tiny-mixtral --out runs/tiny-mixtral-ft --set train.steps=20

Nothing here is a trained model: the loss starts near log(vocabulary) and falls as it trains.
"""

import argparse
import os
from pathlib import Path

import tokenizers
import torch
import transformers

VOCAB = 512


def config(family: str):
    """A 2-layer config of ``family`` (hidden size 64, 4 experts of which 2 per token)."""
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=None)  # the tokenizer's
    t = transformers
    configs = {
        "mixtral": lambda: t.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **common),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                              num_experts_per_tok=2, shared_expert_intermediate_size=64, **common),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                              num_experts_per_tok=2, head_dim=16, **common),
        "olmoe": lambda: t.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **common),
    }
    if family not in configs:
        raise SystemExit(f"--family must be one of {sorted(configs)}, got {family!r}")
    return configs[family]()


def tokenizer(texts) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of ``VOCAB`` tokens (every byte is a token, so no text is unknown)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="where to write the model (created)")
    ap.add_argument("--family", default="mixtral", help="mixtral (default), qwen2_moe, qwen3_moe or olmoe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder = Path(args.folder)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config(args.family))
    model.save_pretrained(folder)
    sources = sorted(Path(os.__file__).parent.glob("*.py"))[:40]  # the standard library: on every machine
    tokenizer((p.read_text(encoding="utf-8", errors="ignore") for p in sources)).save_pretrained(folder)
    print(f"{folder}: a 2-layer {args.family} model ({sum(p.numel() for p in model.parameters())} parameters, "
          f"random weights) and a {VOCAB}-token tokenizer")


if __name__ == "__main__":
    main()
