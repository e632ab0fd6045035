"""LoRA: identity at start, merged == unmerged, save/load, what trains, PEFT key layout."""
import pytest
import torch

from infra.cli import UserError
from infra.lorafile import load_lora_file
from lora import LoRALinear, inject_lora, load_lora, lora_layers, lora_state_dict, merge_lora, save_lora


def unet_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)  # (B, C, F, h, w)
    text = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, 500, encoder_hidden_states=text).sample


def randomise(params, seed=1):
    """Give every B a non-zero value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_identity_at_initialisation(tiny_model):
    before = unet_output(tiny_model)
    inject_lora(tiny_model.unet, rank=4)
    torch.testing.assert_close(unet_output(tiny_model), before, rtol=0, atol=0)


def test_targets_spatial_and_temporal_attention(tiny_model):
    inject_lora(tiny_model.unet, rank=4)
    names = list(lora_layers(tiny_model.unet))
    suffixes = {n.split(".attn")[-1] for n in names}
    assert suffixes == {"1.to_q", "1.to_k", "1.to_v", "1.to_out.0", "2.to_q", "2.to_k", "2.to_v", "2.to_out.0"}
    assert any("temp_attentions" in n for n in names) and any(".attentions." in n for n in names)
    assert any(n.startswith("transformer_in") for n in names)


def test_only_lora_parameters_train(tiny_model):
    params = inject_lora(tiny_model.unet, rank=4)
    trainable = [p for p in tiny_model.unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert len(params) == 2 * len(lora_layers(tiny_model.unet))


def test_merged_equals_unmerged(tiny_model):
    params = inject_lora(tiny_model.unet, rank=4, alpha=8)
    randomise(params)
    unmerged = unet_output(tiny_model)
    assert not torch.allclose(unmerged, unet_output_without_lora(tiny_model))
    merge_lora(tiny_model.unet)
    assert not lora_layers(tiny_model.unet)  # unwrapped: plain nn.Linear again
    torch.testing.assert_close(unet_output(tiny_model), unmerged, rtol=1e-4, atol=1e-5)


def unet_output_without_lora(model):
    layers = lora_layers(model.unet)
    saved = {n: layer.scaling for n, layer in layers.items()}
    for layer in layers.values():
        layer.scaling = 0.0
    out = unet_output(model)
    for n, layer in layers.items():
        layer.scaling = saved[n]
    return out


def test_matches_the_lora_equation():
    """h = W0 x + (alpha / r) B A x, Eq. (3) of Hu et al. 2106.09685, checked by hand."""
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3)
    randomise([layer.lora_B.weight])
    x = torch.randn(4, 6)
    expected = base(x) + 1.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_save_load_round_trip_with_peft_keys(tiny_model, tiny_folder, tmp_path):
    from models import load_video_model

    params = inject_lora(tiny_model.unet, rank=4, alpha=2)
    randomise(params)
    path = tmp_path / "lora.safetensors"
    save_lora(tiny_model.unet, path)
    keys = lora_state_dict(tiny_model.unet)
    some = next(k for k in keys if k.endswith("attn1.to_q.lora_A.weight"))
    assert some.startswith("unet.") and keys[some].shape[0] == 4
    fresh = load_video_model(str(tiny_folder))
    load_lora(fresh.unet, path)  # injects rank 4, alpha 2 from the file's metadata
    layer = next(iter(lora_layers(fresh.unet).values()))
    assert (layer.rank, layer.scaling) == (4, 0.5)
    torch.testing.assert_close(unet_output(fresh), unet_output(tiny_model))


def test_load_refuses_a_file_for_another_model(tiny_model, tmp_path):
    other = torch.nn.Sequential()
    other.add_module("to_q", torch.nn.Linear(3, 3))
    inject_lora(other, rank=2, targets=("to_q",))
    save_lora(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit"):  # lora.py: a plain error; the scripts' check says the fix
        load_lora(tiny_model.unet, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not fit this model .*; load it into the model it was trained on"):
        load_lora_file(tiny_model.unet, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_lora_file(tiny_model.unet, tmp_path / "missing.safetensors")


def test_bf16_rounds_lr_sized_updates_as_lora_py_says():
    """lora.py's reason for float32 adapters, held to torch: an update of 2e-4 lands in bf16 as 1.83e-4
    on a weight of 0.01 and vanishes on one of 0.0625 or more; float32 keeps it."""
    def applied(w, dtype):
        w = torch.tensor(w, dtype=dtype)
        return (w + torch.tensor(2e-4, dtype=dtype) - w).item()

    assert applied(0.01, torch.bfloat16) == 0.00018310546875
    assert applied(0.0625, torch.bfloat16) == applied(0.1, torch.bfloat16) == 0.0
    assert applied(0.06, torch.bfloat16) != 0.0  # just below 0.0625 it still moves
    assert torch.finfo(torch.bfloat16).eps == 2.0**-7  # 7 stored bits + the implicit one: 8 significant bits
    assert all(abs(applied(w, torch.float32) - 2e-4) < 1e-8 for w in (0.01, 0.0625, 0.1))


def test_mixed_precision_keeps_lora_in_float32():
    base = torch.nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4)
    randomise([layer.lora_B.weight])
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    assert base.weight.grad is None


def saved_by(fn):
    """The tensors autograd saves for backward while fn() runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_what_a_frozen_linear_and_the_lora_update_save():
    """The claim of lora.LoRAUpdate: a frozen base layer keeps only its weight, and the adapter
    keeps its bf16 input itself (one shared tensor for q, k and v), not a float32 copy."""
    base = torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    assert [t.data_ptr() for t in saved_by(lambda: base(x))] == [base.weight.data_ptr()]
    layers = [LoRALinear(torch.nn.Linear(8, 8).to(torch.bfloat16), rank=2) for _ in range(3)]  # q, k, v
    saved = saved_by(lambda: [layer(x) for layer in layers])
    inputs = [t for t in saved if t.shape == x.shape]
    assert len(inputs) == 3 and all(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in inputs)
    plain = saved_by(lambda: layers[0].lora_A(x.float()))  # the plain form keeps a float32 copy of x
    assert any(t.shape == x.shape and t.dtype == torch.float32 for t in plain)
