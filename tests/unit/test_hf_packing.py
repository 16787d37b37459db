"""Packed rows are exact and pads never reach an expert (moesaic.hf.packing, the token mask of HFMoEBlock)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moesaic.hf  # noqa: E402
from support.hf_models import FAMILIES, V, randomise, tiny_config  # noqa: E402


def _model(family, seed=0):
    cfg = tiny_config(family)
    if family == "deepseek_v3":  # MLA repeats no kv heads: transformers' attention needs kv heads == heads
        cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomise(model, seed)
    return moesaic.hf.load(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_give_the_logits_of_each_document_alone(family):
    # 4 documents and a tail of padding in row 0, 2 documents in row 1; GPT-OSS's sliding window (4) is
    # shorter than most documents, so its own mask path is exercised
    model = _model(family).eval()
    g = torch.Generator().manual_seed(1)
    rows = [[5, 9, 3, 7], [12, 8]]
    T = 28
    docs = [[torch.randint(0, V, (n,), generator=g) for n in lens] for lens in rows]
    ids = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, row in enumerate(docs):
        at = 0
        for d in row:
            ids[b, at:at + len(d)], pos[b, at:at + len(d)], mask[b, at:at + len(d)] = d, torch.arange(len(d)), True
            at += len(d)
        pos[b, at:] = torch.arange(T - at)
    with torch.no_grad():
        packed = model(input_ids=ids, token_mask=mask, **moesaic.hf.packed_forward_kwargs(model, pos)).logits
        for layer in moesaic.hf.converted_layers(model).values():  # the pads reached no expert
            assert int(layer.tokens_per_expert.sum()) == int(mask.sum()) * layer.k
        for b, row in enumerate(docs):
            at = 0
            for d in row:
                alone = model(input_ids=d[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[b, at:at + len(d)], alone, atol=1e-5, rtol=1e-5)
                at += len(d)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_pads_never_reach_an_expert_and_the_balance_loss_leaves_them_out(family):
    model = _model(family).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 9), generator=g)
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, 5:] = 0
    out = model(input_ids=ids, attention_mask=attention, output_router_logits=True)
    for layer in moesaic.hf.converted_layers(model).values():
        assert int(layer.tokens_per_expert.sum()) == 14 * layer.k  # 9 + 5 real tokens, k routes each
    # real tokens compute what they compute unpadded
    alone = model(input_ids=ids[1:, :5]).logits
    torch.testing.assert_close(out.logits[1:, :5], alone, atol=1e-5, rtol=1e-5)
    # answer_loss's balance loss is transformers' own, pads excluded through the mask
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[1, 4:] = -100
    batch = {"input_ids": ids, "position_ids": torch.arange(9).expand(2, 9), "shift_labels": labels,
             "token_mask": attention.bool(), "packed": False}
    loss, ce_sum, aux = moesaic.hf.answer_loss(model, batch, denominator=12)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=1e-6)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(ce_sum, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ce / 12 + model.config.router_aux_loss_coef * out.aux_loss, atol=1e-5, rtol=1e-5)
    # a token_mask that covers nothing real is refused with its shape
    with pytest.raises(ValueError, match="token mask"):
        model(input_ids=ids, token_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]))


@pytest.mark.parametrize("policy", ["block", "moe"])
def test_padded_rows_under_recompute_equal_the_run_without(policy):
    # the two features together: a recompute in backward routes with the same pad mask as its forward
    def step(recompute):
        model = _model("olmoe").train()
        if recompute:
            moesaic.apply_recompute(model, policy)
        ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
        attention = torch.ones(2, 9, dtype=torch.long)
        attention[0, 6:] = 0
        out = model(input_ids=ids, attention_mask=attention, output_router_logits=True)
        (out.logits.float().pow(2).mean() + out.aux_loss).backward()
        loads = [int(layer.tokens_per_expert.sum()) for layer in moesaic.hf.converted_layers(model).values()]
        return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, loads

    logits, grads, loads = step(False)
    logits_r, grads_r, loads_r = step(True)
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    assert loads_r == loads and set(grads_r) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()) + 1e-12, msg=name)
