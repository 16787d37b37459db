"""Training a converted Hugging Face model with the engine: the loss, per-expert groups, exact resume, export."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from support.hf_models import V, build  # noqa: E402

CONFIG = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "gradient_clipping": 1.0, "moe": {"split_by": "expert"}}


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (2, 8), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build("qwen2_moe", tmp_path_factory.mktemp("train") / "qwen2_moe")


def test_causal_lm_loss_is_cross_entropy_plus_the_configs_router_loss(folder):
    model = moesaic.hf.load(folder, z_loss_coef=0.01).train()
    ids = batches(1)[0]["input_ids"]
    loss = moesaic.hf.causal_lm_loss(model, {"input_ids": ids})
    out = model(ids, output_router_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    z = sum(layer.z_loss for layer in moesaic.hf.converted_layers(model).values())
    coef = model.config.router_aux_loss_coef
    assert coef > 0 and z.item() > 0
    torch.testing.assert_close(loss, ce + coef * out.aux_loss + z, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        moesaic.hf.causal_lm_loss(model, model(ids, labels=ids, output_router_logits=False))
    with pytest.raises(ValueError, match="labels"):
        moesaic.hf.causal_lm_loss(model, model(ids, output_router_logits=True))
    with pytest.raises(TypeError, match="outputs_or_batch"):
        moesaic.hf.causal_lm_loss(model, ids)


def _train(engine, data):
    losses = []
    for b in data:
        loss = moesaic.hf.causal_lm_loss(engine, b)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_engine_trains_groups_by_expert_and_resumes_exactly(folder, tmp_path):
    data = batches(6)
    engine, opt, *_ = moesaic.initialize(model=moesaic.hf.load(folder), config=CONFIG)
    names = {g["name"] for g in opt.param_groups}
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert {f"params/{layer}/expert_{n}" for n in range(6)} <= names, sorted(names)
    first = _train(engine, data[:3])
    engine.save_checkpoint(tmp_path / "ckpt")
    rest = _train(engine, data[3:])

    again, *_ = moesaic.initialize(model=moesaic.hf.load(folder), config=CONFIG)
    again.load_checkpoint(tmp_path / "ckpt")
    assert _train(again, data[3:]) == rest  # bitwise: same steps from the same state
    mine, theirs = engine.module.state_dict(), again.module.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    # repeated training on one batch learns, and the fine-tuned model exports to a folder transformers loads
    fixed = [data[0]] * 8
    losses = _train(again, fixed)
    assert losses[-1] < losses[0] - 0.1, (first, losses)
    moesaic.hf.save(again.module, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(data[0]["input_ids"]).logits, again.module(data[0]["input_ids"]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_deepseek_bias_moves_when_asked(tmp_path):
    folder = build("deepseek_v3", tmp_path / "ds")
    model = moesaic.hf.load(folder, bias_update_rate=1e-2, seq_aux_loss_coef=1e-3)
    engine, *_ = moesaic.initialize(model=model, config=CONFIG)
    layer = model.model.layers[1].mlp
    before = layer.expert_bias.clone()
    _train(engine, batches(2))
    assert layer.seq_aux_loss is not None and layer.seq_aux_loss.item() > 0
    assert not torch.equal(layer.expert_bias, before)
    # the bias is the checkpoint's e_score_correction_bias: the export carries the moved one
    moesaic.hf.save(model, tmp_path / "out")
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["model.layers.1.mlp.gate.e_score_correction_bias"], layer.expert_bias)


def test_hf_memory_check_names_the_model_when_it_alone_exceeds_memory(folder, monkeypatch):
    # issue 21: a model too large for the machine was reported as a micro-batch too large
    from moesaic.train import memory
    from moesaic.train.config import load_train_config
    from moesaic.train.hf import HFRun
    from moesaic.train.loop import check_memory, run_memory

    cfg = load_train_config({"model": {"block_size": 8}, "train": {"nproc": 1},
                             "engine": {"train_micro_batch_size_per_gpu": 1}})
    need = run_memory(HFRun(folder), cfg)
    room = need.model_state // 2  # the machine holds half of the parameters and optimizer state
    monkeypatch.setattr(memory, "machine_memory", lambda device: (room, room, "this machine's memory"))
    with pytest.raises(ValueError, match=r"^the model does not fit in this machine's memory .*: its parameters, "
                                         r"gradients and optimizer state alone need about .* more than there is"):
        check_memory(HFRun(folder), cfg, torch.device("cpu"), 1)
