"""Tiny Hugging Face MoE models of the six families, built offline from their config classes.

Shared by the bridge's unit, integration and distributed tests (spawned ranks import it by name).
Import it only after ``pytest.importorskip("transformers")``.
"""

import torch
import transformers

V, D, B, T = 64, 16, 2, 7
COMMON = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
              max_position_embeddings=64, tie_word_embeddings=False)


def tiny_config(family: str):
    """A 2-layer config of ``family`` whose MoE blocks exercise the family's options."""
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, **COMMON)
    if family == "qwen3_moe":  # layer 1 dense (mlp_only_layers), and tied embeddings
        return t.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=8, num_experts_per_tok=4,
                                norm_topk_prob=True, head_dim=8, mlp_only_layers=[1],
                                **{**COMMON, "tie_word_embeddings": True})
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
                             **COMMON)
    if family == "deepseek_v3":  # layer 0 dense (first_k_dense_replace), group-limited top-k, 2 shared experts
        return t.DeepseekV3Config(intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8,
                                  n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
                                  norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
                                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None, **COMMON)
    if family == "gpt_oss":
        return t.GptOssConfig(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                              swiglu_limit=0.6, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                              **COMMON)
    raise KeyError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def randomise(model, seed=0):
    """Weights large enough that routing, the GPT-OSS clamp and the DeepSeek bias all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def build(family, folder, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder


def batch(seed=1):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return ids


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(texts, vocab_size=300, chat_template=CHATML):
    """A fast byte-level BPE tokenizer (``vocab_size`` > 260) trained on ``texts``, with ChatML's special tokens and template."""
    import tokenizers

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    out.chat_template = chat_template
    return out
