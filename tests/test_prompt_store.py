"""Prompt sets of any size (infra/prompt_store.py): the training prompts' embeddings wait in host
memory and only a micro-batch's rows reach the model's device; a costly encoder's embeddings are
read back from disk by the next run instead of encoded again."""
from types import SimpleNamespace

import torch

import vader
from infra.prompt_store import costly, encoder_key, prompt_embeddings
from infra.setup import batch_drawer
from models import load_video_model


def test_only_a_micro_batch_reaches_the_device():
    """The store stays in host memory; draw_batch moves its B rows (and draws the noise) on the
    model's device. "meta" stands in for a GPU: nothing of it is computed."""
    model = SimpleNamespace(device="meta", latent_channels=4, latent_frames=lambda f: f, vae_factor=8)
    cfg = SimpleNamespace(batch_size=2, frames=3, height=16, width=16)
    store = torch.randn(1000, 7, 5)  # (P, L, D) in host memory
    prompts, rows, z_T = batch_drawer(model, cfg, [str(i) for i in range(1000)], store, torch.Generator())()
    assert rows.device.type == z_T.device.type == "meta" and rows.shape == (2, 7, 5) and len(prompts) == 2
    assert store.device.type == "cpu" and z_T.shape == (2, 4, 3, 2, 2)


def test_a_second_run_reads_the_embeddings_instead_of_encoding(tiny_folder, tmp_path, monkeypatch):
    model = load_video_model(str(tiny_folder))
    encoded = []
    real = vader.encode_prompts
    monkeypatch.setattr(vader, "encode_prompts", lambda m, ps, b=32: encoded.extend(ps) or real(m, ps, b))
    prompts = [f"a cat number {i} #{i}" for i in range(40)]
    first = prompt_embeddings(model, prompts, cache=tmp_path)
    assert len(encoded) == 40 and first.shape == (40, 77, 32) and first.device.type == "cpu"
    encoded.clear()
    again = prompt_embeddings(model, prompts[:5] + ["a new prompt"], cache=tmp_path)
    assert encoded == ["a new prompt"]  # the 5 known ones read from disk
    assert torch.equal(again[:5], first[:5])
    torch.testing.assert_close(again[5], real(model, ["a new prompt"])[0])
    assert torch.equal(prompt_embeddings(model, prompts[:3], cache=""), first[:3])  # no cache: encoded, the same


def test_the_key_changes_with_what_changes_an_embedding(tiny_folder, wan_folder):
    tiny, wan = load_video_model(str(tiny_folder)), load_video_model(str(wan_folder))
    assert encoder_key(tiny) == encoder_key(load_video_model(str(tiny_folder)))
    assert encoder_key(tiny) != encoder_key(wan)
    half = load_video_model(str(tiny_folder), dtype=torch.bfloat16)
    assert encoder_key(half) != encoder_key(tiny)
    assert not costly(tiny)  # a 1e9-parameter encoder (Wan's UMT5-XXL) is; the tiny ones are not
