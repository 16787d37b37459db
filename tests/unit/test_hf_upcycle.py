"""``moesaic.hf.upcycle``: dense Llama/Qwen2/Qwen3 models into MoE models whose experts copy the dense MLP."""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from support.hf_models import COMMON, batch, build, randomise  # noqa: E402

SIBLING = {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def dense(kind, folder):
    t = transformers
    cfg = {"llama": lambda: t.LlamaConfig(intermediate_size=24, **COMMON),
           "qwen2": lambda: t.Qwen2Config(intermediate_size=24, **COMMON),
           "qwen3": lambda: t.Qwen3Config(intermediate_size=24, head_dim=8,
                                          **{**COMMON, "tie_word_embeddings": True})}[kind]()
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(cfg)
    randomise(model)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_upcycled_logits_equal_the_dense_models(kind, tmp_path):
    ref = dense(kind, tmp_path / "dense")
    moe = moesaic.hf.upcycle(tmp_path / "dense", num_experts=4, top_k=2).eval()
    assert type(moe).__name__ == SIBLING[kind]
    layers = moesaic.hf.converted_layers(moe)
    assert len(layers) == 2
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # the random routers spread the tokens: the copies will get different gradients and drift apart
    assert all(int((layer.exp_counts > 0).sum()) > 1 for layer in layers.values())
    mlp = ref.get_submodule("model.layers.1.mlp")
    for n in range(4):
        copy = layers["model.layers.1.mlp"].experts.expert_state_dict(n)["up_proj.weight"]
        assert torch.equal(copy, mlp.up_proj.weight)
    # exported, it is an ordinary MoE checkpoint of the sibling architecture
    moesaic.hf.save(moe, tmp_path / "moe")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert type(back).__name__ == SIBLING[kind]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_upcycle_trains(tmp_path):
    dense("qwen3", tmp_path / "dense")
    moe = moesaic.hf.upcycle(tmp_path / "dense", num_experts=4, top_k=2)
    engine, *_ = moesaic.initialize(model=moe, config={"train_micro_batch_size_per_gpu": 2,
                                                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    ids = batch()
    for _ in range(2):
        loss = moesaic.hf.causal_lm_loss(engine, {"input_ids": ids})
        engine.backward(loss)
        engine.step()
    experts = moe.model.layers[0].mlp.experts
    first, second = experts.expert_state_dict(0), experts.expert_state_dict(1)
    assert not torch.equal(first["up_proj.weight"], second["up_proj.weight"])


def test_upcycle_refuses_moe_and_bad_arguments(tmp_path):
    build("olmoe", tmp_path / "olmoe")
    with pytest.raises(ValueError, match="already an MoE"):
        moesaic.hf.upcycle(tmp_path / "olmoe", 4, 2)
    model = moesaic.hf.load(tmp_path / "olmoe")
    with pytest.raises(ValueError, match="already an MoE"):
        moesaic.hf.upcycle(model, 4, 2)
    ref = dense("llama", tmp_path / "dense")
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=4\], got 5"):
        moesaic.hf.upcycle(ref, 4, 5)
    with pytest.raises(ValueError, match="num_experts"):
        moesaic.hf.upcycle(ref, 1, 1)
    with pytest.raises(ValueError, match="ep_size=3 does not divide num_experts=4"):
        moesaic.hf.upcycle(ref, 4, 2, ep_size=3)
    assert type(ref.model.layers[0].mlp).__name__ == "LlamaMLP"  # the dense model is untouched
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "dense", bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        moesaic.hf.upcycle(bad, 4, 2)
