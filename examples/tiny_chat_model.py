"""Write a tiny OLMoE chat model folder to fine-tune in a few seconds: 2 layers, 8 experts, random weights.

Its tokenizer is a byte-level BPE trained on the chat file (vocabulary 1024, ChatML's special tokens
and template), so ``moesaic train --hf FOLDER --data data/stdlib_chat.jsonl`` runs end to end on a
laptop. A real checkpoint folder (config.json, safetensors, tokenizer with a chat template) needs none
of this.

    python examples/tiny_chat_model.py runs/tiny-olmoe [--data data/stdlib_chat.jsonl]
"""

import argparse
import json
from pathlib import Path

import tokenizers
import torch
import transformers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "stdlib_chat.jsonl"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    raw = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    raw.train_from_iterator([m["content"] for r in rows for m in r["messages"]], tokenizers.trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    config = transformers.OlmoeConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                      vocab_size=len(tok), max_position_embeddings=2048,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.out}: OLMoE, 2 layers, 8 experts, vocabulary {len(tok)}, with a chat template")


if __name__ == "__main__":
    main()
