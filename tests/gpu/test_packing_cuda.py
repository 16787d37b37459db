"""Packed rows on CUDA: each document's logits equal the document run alone (issue 25, item 3).

The CPU twin is tests/unit/test_hf_packing.py. On CUDA ``transformers`` picks other attention
paths: SDPA's fused kernels with the block-diagonal mask it builds from restarting
``position_ids``, and, where the ``flash_attn`` package is installed, FlashAttention-2's varlen
kernel, which reads the document boundaries from ``position_ids`` alone. Skipped without CUDA
(``make gpu-check`` runs this folder).
"""

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moesaic.hf  # noqa: E402
from support.hf_models import FAMILIES, V, randomise, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (attention implementation, dtype, tolerance): fp32 paths to round-off of fused kernels; flash
# attention computes in bf16 only
IMPLEMENTATIONS = [("eager", torch.float32, 1e-4), ("sdpa", torch.float32, 1e-4)]
if importlib.util.find_spec("flash_attn") is not None:
    IMPLEMENTATIONS.append(("flash_attention_2", torch.bfloat16, 3e-2))


def _model(family, implementation, dtype):
    cfg = tiny_config(family)
    if family == "deepseek_v3":  # MLA repeats no kv heads: transformers' attention needs kv heads == heads
        cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=implementation)
    randomise(model, 0)
    return moesaic.hf.load(model).to("cuda", dtype).eval()


@pytest.mark.parametrize("implementation,dtype,tol", IMPLEMENTATIONS, ids=[i[0] for i in IMPLEMENTATIONS])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_give_the_logits_of_each_document_alone_on_cuda(family, implementation, dtype, tol):
    try:
        model = _model(family, implementation, dtype)
    except (ValueError, ImportError) as err:  # a family whose attention does not offer this implementation
        pytest.skip(f"{family} with {implementation}: {err}")
    g = torch.Generator().manual_seed(1)
    rows = [[5, 9, 3, 7], [12, 8, 4]]  # no padding: flash's varlen path reads boundaries from position_ids only
    T = 24
    docs = [[torch.randint(0, V, (n,), generator=g) for n in lens] for lens in rows]
    ids = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    for b, row in enumerate(docs):
        at = 0
        for d in row:
            ids[b, at:at + len(d)], pos[b, at:at + len(d)] = d, torch.arange(len(d))
            at += len(d)
    ids, pos = ids.cuda(), pos.cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, **moesaic.hf.packed_forward_kwargs(model, pos)).logits.float()
        for b, row in enumerate(docs):
            at = 0
            for d in row:
                alone = model(input_ids=d[None].cuda(), use_cache=False).logits[0].float()
                torch.testing.assert_close(packed[b, at:at + len(d)], alone, atol=tol, rtol=tol)
                at += len(d)
