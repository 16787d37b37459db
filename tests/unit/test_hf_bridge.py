"""``moesaic.hf.load`` / ``save`` against ``transformers`` itself, family by family.

For each of the six families a tiny model (2 decoder layers) is built offline from its config class,
its weights randomised, and saved with ``save_pretrained``. Then ``moesaic.hf.load(folder)`` must
give the logits (eval and train mode), the loss, the ``aux_loss`` and the gradients of
``AutoModelForCausalLM.from_pretrained(folder)``; ``moesaic.hf.save`` must write the input's tensors
back bitwise under the same names, in a folder ``from_pretrained`` loads with no missing or
unexpected key; and bad input must be refused with errors naming the file, key or value.
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from moesaic.hf import HFMoEBlock  # noqa: E402
from moesaic.hf.families import FAMILIES as SPECS  # noqa: E402


def family_layouts(family, config):
    return SPECS[family].layouts(config)

from support.hf_models import COMMON, D, FAMILIES, batch, build, randomise, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: build(f, root / f) for f in FAMILIES}


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_logits_match_transformers(family, folders):
    ref, mine = reference(folders[family]).eval(), moesaic.hf.load(folders[family]).eval()
    blocks = moesaic.hf.converted_layers(mine)
    assert blocks and all(isinstance(m, HFMoEBlock) for m in blocks.values())
    for path, layer in blocks.items():
        assert layer.expert_group_name == path and path.startswith("model.layers.")
        assert layer.experts.local_numbers == list(range(layer.num_experts))
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, ref(ids).logits, **CLOSE)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_loss_aux_and_gradients_match(family, folders):
    # routing is deterministic for every family's options (no jitter, no sampling): train mode must agree too
    ref, mine = reference(folders[family]).train(), moesaic.hf.load(folders[family]).train()
    ids = batch(2)
    out_ref = ref(ids, labels=ids, output_router_logits=True)
    out_me = mine(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out_me.logits, out_ref.logits, **CLOSE)
    torch.testing.assert_close(out_me.loss, out_ref.loss, **CLOSE)
    if family == "deepseek_v3":
        assert getattr(out_ref, "aux_loss", None) is None  # DeepSeek-V3 reports none
    else:
        assert out_ref.aux_loss is not None and out_ref.aux_loss.item() > 0
        torch.testing.assert_close(out_me.aux_loss, out_ref.aux_loss, **CLOSE)
    out_ref.loss.backward()
    out_me.loss.backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for name, p in mine.named_parameters():
        if name in ref_grads:  # attention, norms, embeddings, dense MLPs
            torch.testing.assert_close(p.grad, ref_grads[name], **CLOSE, msg=lambda m: f"{family} {name}: {m}")
    for path, layer in moesaic.hf.converted_layers(mine).items():
        router = ref.get_submodule(path + (".router" if family == "gpt_oss" else ".gate"))
        torch.testing.assert_close(layer.gate.wg.weight.grad, router.weight.grad, **CLOSE)
        # every expert's gradient, read out of transformers' stacked gradients by the fused layout's views
        fused = family_layouts(family, ref.config)[1]
        hf_experts = ref.get_submodule(path + ".experts")
        for f in fused.fused:
            grad = getattr(hf_experts, f.key.split(".")[-1]).grad
            for n in range(layer.num_experts):
                mine_n = layer.experts.expert_grads(n)
                for name, get in f.pieces:
                    torch.testing.assert_close(mine_n[name], get(grad[n]), **CLOSE,
                                               msg=lambda m: f"{family} {path} expert {n} {name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_after_load_is_bitwise_the_input(family, folders, tmp_path):
    from safetensors.torch import load_file

    mine = moesaic.hf.load(folders[family])
    moesaic.hf.save(mine, tmp_path / "out")
    src = load_file(str(folders[family] / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(src)
    for k in src:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((folders[family] / "config.json").read_text())
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("family", FAMILIES)
def test_per_module_experts_option(family, folders, tmp_path):
    # stacked experts are the default layout; stacked_experts=False gives one module per expert,
    # computing the same logits, loss and gradients, and exporting the same bits
    ref = reference(folders[family]).train()
    default = moesaic.hf.load(folders[family]).train()
    mine = moesaic.hf.load(folders[family], stacked_experts=False).train()
    assert all(isinstance(m.experts, moesaic.StackedExperts) for m in moesaic.hf.converted_layers(default).values())
    assert not any(isinstance(m.experts, moesaic.StackedExperts) for m in moesaic.hf.converted_layers(mine).values())
    ids = batch(2)
    out_ref, out_me = ref(ids, labels=ids), mine(ids, labels=ids)
    torch.testing.assert_close(out_me.logits, out_ref.logits, **CLOSE)
    out_me.loss.backward()
    default(ids, labels=ids).loss.backward()
    for path, layer in moesaic.hf.converted_layers(mine).items():
        other = moesaic.hf.converted_layers(default)[path]
        for n in range(layer.num_experts):
            for name, g in layer.experts.expert_grads(n).items():
                torch.testing.assert_close(g, other.experts.expert_grads(n)[name], **CLOSE)
    moesaic.hf.save(mine, tmp_path)
    from safetensors.torch import load_file

    src, out = load_file(str(folders[family] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_built_model_converts_in_place_and_saves_as_save_pretrained(family, folders, tmp_path):
    from safetensors.torch import load_file

    model = reference(folders[family]).eval()
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    assert moesaic.hf.load(model) is model
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, **CLOSE)
    moesaic.hf.save(model, tmp_path)
    src, out = load_file(str(folders[family] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)


def test_generate_matches(folders):
    ref, mine = reference(folders["olmoe"]).eval(), moesaic.hf.load(folders["olmoe"]).eval()
    ids = batch()[:1, :3]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(mine.generate(ids, **kw), ref.generate(ids, **kw))


def test_fused_layout_folder_round_trips(folders, tmp_path):
    # a folder holding transformers 5's in-memory fused tensors (experts.gate_up_proj) loads and is written back so
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "fused"
    shutil.copytree(folders["mixtral"], folder)
    model = reference(folders["mixtral"])
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    save_file(fused, str(folder / "model.safetensors"), metadata={"format": "pt"})
    mine = moesaic.hf.load(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(batch()).logits, model.eval()(batch()).logits, **CLOSE)
    assert set(mine.moesaic_hf_layouts.values()) == {"fused"}
    moesaic.hf.save(mine, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(fused) and all(torch.equal(out[k], fused[k]) for k in fused)


# --- bad input -------------------------------------------------------------------------------------

def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        moesaic.hf.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        moesaic.hf.load(tmp_path)
    (tmp_path / "config.json").write_text("{\"hidden_size\": 4}")
    with pytest.raises(ValueError, match="model_type"):
        moesaic.hf.load(tmp_path)
    with pytest.raises(TypeError, match="path_or_model"):
        moesaic.hf.load(3)
    with pytest.raises(TypeError, match="path_or_model"):
        moesaic.hf.load(torch.nn.Linear(2, 2))


def test_no_safetensors(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders["olmoe"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        moesaic.hf.load(folder)


def test_unsupported_architecture_lists_the_supported(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()}, intermediate_size=24)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='llama'.*upcycle.*'mixtral', 'qwen2_moe'.*'gpt_oss'"):
        moesaic.hf.load(tmp_path)


def test_truncated_safetensors_names_the_file(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders["qwen3_moe"], folder)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        moesaic.hf.load(folder)
    f.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        moesaic.hf.load(folder)


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_unused_and_missing_keys_are_named(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders["olmoe"], folder)
    _rewrite(folder, lambda t: t.update({"model.layers.0.mlp.experts.8.up_proj.weight": torch.zeros(24, D)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts\.8\.up_proj\.weight'.*not used"):
        moesaic.hf.load(folder)
    shutil.rmtree(folder)
    shutil.copytree(folders["olmoe"], folder)
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.5.down_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight'"):
        moesaic.hf.load(folder)
    shutil.rmtree(folder)
    shutil.copytree(folders["olmoe"], folder)
    _rewrite(folder, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"no tensor 'model\.norm\.weight'"):
        moesaic.hf.load(folder)


def test_config_weights_shape_mismatch_names_the_key_and_shapes(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders["deepseek_v3"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe_intermediate_size"] = 10
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.(shared_experts|experts\.0)\.\w+\.weight'.*"
                                         r"has shape \((12, 16|16, 12|24, 16|16, 24)\)"):
        moesaic.hf.load(folder)
    cfg["moe_intermediate_size"], cfg["n_routed_experts"] = 12, 4
    cfg["n_group"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config/weights mismatch: tensor 'model\.layers\.1\.mlp\.gate\.weight'.*"
                                         r"\(8, 16\).*\(4, 16\)"):
        moesaic.hf.load(folder)


def test_ep_size_and_options_are_checked_and_the_model_is_untouched(folders):
    with pytest.raises(ValueError, match=r"ep_size=3 does not divide.*config\.num_local_experts=4"):
        moesaic.hf.load(folders["mixtral"], ep_size=3)
    model = reference(folders["qwen2_moe"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"ep_size=4 does not divide.*config\.num_experts=6"):
        moesaic.hf.load(model, ep_size=4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['k'\]"):
        moesaic.hf.load(model, k=1)
    with pytest.raises(ValueError, match="ep_size"):
        moesaic.hf.load(model, ep_size=0)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="no moesaic MoE layer"):
        moesaic.hf.save(model, "/tmp/never-written")


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_bf16_checkpoint_round_trips_bitwise(family, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    randomise(model)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "in")
    mine = moesaic.hf.load(tmp_path / "in")
    assert next(mine.parameters()).dtype == torch.bfloat16
    if family == "deepseek_v3":  # the correction bias stays fp32 in the layer (bf16 cannot hold its updates)
        assert mine.model.layers[1].mlp.expert_bias.dtype == torch.float32
    moesaic.hf.save(mine, tmp_path / "out")
    src = load_file(str(tmp_path / "in" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(src) == sorted(out)
    for k in src:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
