"""VideoReward (reward_models/videoreward.py) on a tiny random Qwen2-VL, and the frames it needs.

The reference for every number is the official path: transformers' own Qwen2VLProcessor and
Qwen2-VL forward, with the release's weights loaded into a PEFT model as the release's code
loads them. Then: the spread-frame causal decode equals the full decode, each of the three
scores sends a gradient to the LoRA, and train.py trains on it and resumes exactly.
"""
import csv
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from infra.cli import UserError, run_cli
from infra.frames import default_decode_frames
from infra.miniature import defaults_left
from reward_models.tiny_videoreward import build_tiny_videoreward, tiny_videoreward
from lora import inject_lora
from models import load_video_model
from reward_models import videoreward as vr
from sampler import sample
from vader import decode_f_frames, encode_prompts, spread_frames

PROMPTS = ["a cat", "a red fox running through deep snow at dawn"]  # different lengths: padding is exercised


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_videoreward")
    build_tiny_videoreward(path)
    return path


@pytest.fixture(scope="module")
def reward(folder):
    return vr.videoreward(base=str(folder), weights=str(folder))


def smooth_uint8(b, f, h, w, seed=0):
    """Frames with no sharp edges (upsampled noise), as uint8: the processor's uint8 rounding and
    clamping then differ from our float path by at most about one level."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(b * f, 3, 4, 6, generator=g), size=(h, w), mode="bilinear")
    return (x * 255).round().to(torch.uint8).view(b, f, 3, h, w)


def processor_batch(folder, video, prompts, max_pixels=vr.MAX_PIXELS):
    """The official path: the chat (video, then the instruction) through the processor, as the
    release's inference does, with its pixel budget."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(vr.REWARD_TOKENS)})  # as the release does
    chats = [[{"role": "user", "content": [{"type": "video", "video": "clip"},
                                           {"type": "text", "text": vr.PROMPT.format(text_prompt=p)}]}] for p in prompts]
    text = processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    return processor(text=text, videos=list(video), padding=True, padding_side="right", return_tensors="pt",
                     videos_kwargs=dict(size={"shortest_edge": vr.MIN_PIXELS, "longest_edge": max_pixels}))


@pytest.mark.parametrize("size", [(480, 832), (32, 32), (100, 700), (1080, 1920)])
def test_smart_resize_matches_transformers(size):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    assert vr.smart_resize(*size) == smart_resize(*size, factor=28, min_pixels=vr.MIN_PIXELS, max_pixels=vr.MAX_PIXELS)
    assert vr.smart_resize(480, 832) == (336, 588)  # Wan's 480p frames, as the reward reads them


@pytest.mark.parametrize("h, w", [(480, 832), (32, 32)])
def test_inputs_match_the_qwen2_vl_processor(folder, reward, h, w):
    """Token ids and grid exactly; pixel values within the processor's uint8 rounding (it resizes
    uint8 frames and rounds; we resize floats, so the gradient survives)."""
    video = smooth_uint8(2, 4, h, w)
    ref = processor_batch(folder, video, PROMPTS)
    pixels, grid = vr.video_inputs(video.float() / 255)
    assert ref.video_grid_thw.tolist() == [list(grid)] * 2
    err = (pixels - ref.pixel_values_videos).abs()
    # One uint8 level is 1 / 255 / 0.27 = 0.0146 after normalising; torchvision's uint8 bicubic
    # filter, in fixed point, is off by up to a few levels where it upsamples 10x.
    assert err.max() < 0.06 and err.mean() < 0.006
    tokenizer = reward.modules[0].tokenizer
    n = grid[0] * grid[1] * grid[2] // 4
    ours = tokenizer([vr.chat_text(p, n) for p in PROMPTS], padding=True, padding_side="right", return_tensors="pt")
    assert torch.equal(ours.input_ids, ref.input_ids) and torch.equal(ours.attention_mask, ref.attention_mask)


def release_model_in_peft(folder):
    """The release's model as its own code builds it, on transformers 5: Qwen2-VL with an `rm_head`,
    the reward tokens added, a PEFT LoRA on the language model's linears, and then the whole
    model.pth loaded with load_state_dict (keys moved to transformers 5's names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": list(vr.REWARD_TOKENS)})
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    qwen.resize_token_embeddings(len(tokenizer))
    state = torch.load(folder / "checkpoint-1" / "model.pth", weights_only=True)
    qwen.rm_head = torch.nn.Linear(qwen.config.text_config.hidden_size, state["base_model.model.rm_head.weight"].shape[0],
                                   bias=False)
    peft = get_peft_model(qwen, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\..*_proj"))
    renamed = {re.sub(r"^base_model\.model\.visual\.", "base_model.model.model.visual.",
                      re.sub(r"^base_model\.model\.model\.", "base_model.model.model.language_model.", k)): v
               for k, v in state.items()}
    peft.load_state_dict(renamed, strict=True)
    return peft.eval(), tokenizer


@pytest.fixture(scope="module")
def reference(folder):
    """(video, the release model's three raw scores of it): transformers' Qwen2-VL forward on the
    processor's inputs, with PEFT's unmerged LoRA and the plain positions 0, 1, 2, ... the release
    ran with. Frames at a size the reader keeps (multiples of 28 within the budget), so both see
    the same pixels."""
    peft, tokenizer = release_model_in_peft(folder)
    video = smooth_uint8(2, 4, 308, 336)
    batch = processor_batch(folder, video, PROMPTS)
    b, length = batch.input_ids.shape
    with torch.no_grad():
        hidden = peft.base_model.model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values_videos=batch.pixel_values_videos,
            video_grid_thw=batch.video_grid_thw, position_ids=torch.arange(length).expand(3, b, length), use_cache=False,
        ).last_hidden_state  # (B, L, D)
        ids = tokenizer.convert_tokens_to_ids(list(vr.REWARD_TOKENS))
        at = torch.stack([hidden[batch.input_ids == i] for i in ids], dim=1)  # (B, 3, D)
        return video, peft.base_model.model.rm_head(at).diagonal(dim1=1, dim2=2)  # the release's 3-output head: (B, 3)


def raw_scores(model, video):
    with torch.no_grad():
        return model(video.float() / 255, PROMPTS)  # (B, 3)


def test_scores_match_the_release_model(folder, reward, reference):
    """Our three raw scores equal the release model's (`reference`) within 1e-4, and so does their
    normalised sum."""
    video, ref = reference
    ours = raw_scores(reward.modules[0], video)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    mean, std = torch.tensor([m for m, _ in vr.NORMS.values()]), torch.tensor([s for _, s in vr.NORMS.values()])
    torch.testing.assert_close(reward(video.float() / 255, PROMPTS), ((ref - mean) / std).sum(1), rtol=1e-4, atol=1e-4)


def test_the_miniature_release_keeps_no_tensor_at_its_default(folder):
    """Every tensor of the miniature base and of its fine-tune is off its initial default, and every
    tensor of the fine-tune differs from the base's: a converter that drops, merges or transposes
    one changes the scores (the planted mistakes below)."""
    release = torch.load(folder / "checkpoint-1" / "model.pth", weights_only=True)
    base = load_file(folder / "model.safetensors")
    assert defaults_left(release) == [] and defaults_left(base) == []
    shared = [k for k in release if k.removeprefix("base_model.model.").replace(".base_layer.", ".") in base]
    assert len(shared) > 50  # the base folder is written with the release's (transformers 4.45) names
    for key in shared:
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert base[name].shape != release[key].shape or not torch.equal(base[name], release[key]), key


def test_the_conversion_keeps_every_bias_and_merges_only_lora_pairs(folder):
    """Each tensor of the release file reaches the model as it is, but for a LoRA-wrapped weight,
    which becomes W + (alpha / r) B A: a bias (the language model's q, k, v, the whole vision
    tower, the merger) is never taken for its own LoRA pair."""
    release = {k.removeprefix("base_model.model."): v for k, v in
               torch.load(folder / "checkpoint-1" / "model.pth", weights_only=True).items()}
    out = vr.convert_checkpoint({f"base_model.model.{k}": v for k, v in release.items()}, 2.0)
    biases = [k for k in release if k.endswith("bias")]
    assert len(biases) > 20 and all(release[k].abs().sum() > 0 for k in biases)
    for k in biases:
        new = k.replace(".base_layer.", ".")
        new = "qwen.language_model." + new.removeprefix("model.") if new.startswith("model.") else "qwen." + new
        assert torch.equal(out[new], release[k]), k
    q = "model.layers.0.self_attn.q_proj"
    merged = release[f"{q}.base_layer.weight"] + 2.0 * release[f"{q}.lora_B.default.weight"] @ release[f"{q}.lora_A.default.weight"]
    torch.testing.assert_close(out[f"qwen.language_model.{q.removeprefix('model.')}.weight"], merged)


def test_a_lora_tensor_without_its_partner_or_base_is_refused_by_name(folder):
    release = torch.load(folder / "checkpoint-1" / "model.pth", weights_only=True)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    half = {k: v for k, v in release.items() if k != f"{q}.lora_B.default.weight"}
    with pytest.raises(UserError, match="half of the LoRA pair .*q_proj.lora_A"):
        vr.convert_checkpoint(half, 2.0)
    orphan = {**release, "base_model.model.model.layers.0.mlp.extra.lora_A.default.weight": torch.ones(4, 4)}
    with pytest.raises(UserError, match="LoRA tensors with no base weight: .*mlp.extra.lora_A"):
        vr.convert_checkpoint(orphan, 2.0)


def plant_old_bias_merge(out, folder, scale):
    """The mistake the converter once made: every key looked up its LoRA pair by replacing
    '.weight', so a bias was its own pair and came back as bias + scale (bias . bias)."""
    return {k: v + scale * (v @ v) if k.endswith("bias") else v for k, v in out.items()}


def plant_transposed_projection(out, folder, scale):
    """An attention output projection written transposed (its shape is square, so it still loads)."""
    k = "qwen.language_model.layers.0.self_attn.o_proj.weight"
    return {**out, k: out[k].t().contiguous()}


def plant_norm_from_the_base(out, folder, scale):
    """A norm the converter lost, left at the base model's value (what a loader without the key
    would keep from the base folder)."""
    base = load_file(Path(folder) / "model.safetensors")
    return {**out, "qwen.language_model.layers.0.input_layernorm.weight": base["model.layers.0.input_layernorm.weight"]}


@pytest.mark.parametrize("plant", [plant_old_bias_merge, plant_transposed_projection, plant_norm_from_the_base])
def test_a_planted_mapping_mistake_fails_the_parity_check(folder, reference, monkeypatch, plant):
    """Each planted mistake in the conversion moves the scores far outside the parity test's 1e-4
    (BENCHMARKS.md says by how much), so the parity test would have caught it."""
    convert = vr.convert_checkpoint
    monkeypatch.setattr(vr, "convert_checkpoint", lambda state, scale: plant(convert(state, scale), folder, scale))
    video, ref = reference
    wrong = raw_scores(vr.videoreward(base=str(folder), weights=str(folder)).modules[0], video)
    print(f"{plant.__name__}: max |score change| {(wrong - ref).abs().max().item():.4f}")
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, ref, rtol=1e-4, atol=1e-5)
    assert (wrong - ref).abs().max() > 1e-2


def test_a_one_output_head_and_bad_weights(folder, tmp_path):
    """A head of one output (the model card's form) is read at each token; a file that is not a
    VideoReward checkpoint, or a folder without one, is a one-line UserError."""
    build_tiny_videoreward(tmp_path / "one", heads=1)
    one = vr.videoreward(base=str(tmp_path / "one"), weights=str(tmp_path / "one" / "checkpoint-1" / "model.pth"))
    frames = torch.rand(1, 2, 3, 28, 28)
    assert one.scores(frames, ["a cat"]).shape == (1, 3)
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="has no rm_head.weight"):
        vr.videoreward(base=str(folder), weights=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="holds no checkpoint"):
        vr.videoreward(base=str(folder), weights=str(tmp_path))
    with pytest.raises(UserError, match="mq='lots' is not a number"):
        vr.videoreward(base=str(folder), weights=str(folder), mq="lots")


def test_default_decode_frames_follows_the_readers_rule():
    """2 fps of Wan's 16 fps: 33 frames -> 4, 81 -> 10; ModelScope's 16 at 8 fps -> 4; at least 4, never above F."""
    reward = type("R", (), {"fps": 2, "min_frames": 2})()
    assert [default_decode_frames(reward, n, 16) for n in (33, 81, 9)] == [4, 10, 4]
    assert default_decode_frames(reward, 16, 8) == 4 and default_decode_frames(reward, 3, 8) == 3  # an odd count: the last frame repeats
    assert spread_frames(81, 10).tolist() == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]


def test_spread_frames_through_the_causal_decode_are_exact(wan_folder, monkeypatch):
    """Frames spread over a Wan video, decoded a latent frame at a time with the caches in host
    memory (here a copy: the CPU is the host), equal the plain full decode, frames and gradients."""
    import wan_vae

    monkeypatch.setattr(wan_vae, "to_host", lambda t: t.clone())  # a real copy, as to a GPU's host
    model = load_video_model(str(wan_folder))
    model.enable_checkpointing()
    z = torch.randn(1, model.latent_channels, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # 17 pixel frames

    def decode(spread):
        z_ = z.clone().requires_grad_(True)
        if spread:
            x = decode_f_frames(model, z_, 17, 4, None, spread=True, one_at_a_time=True)  # (1, 4, 3, H, W)
        else:
            x = model.decode_frames(z_, spread_frames(17, 4), use_checkpoint=False)
        (x * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return x.detach(), z_.grad

    (ours, grad), (ref, ref_grad) = decode(True), decode(False)
    assert torch.equal(ours, ref)  # float32 rounding of sums taken in another order, at the gradient's scale:
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())
    assert grad[:, :, 0].abs().sum() > 0 and grad[:, :, -1].abs().sum() > 0  # the first and the last latent frame


@pytest.mark.parametrize("score", ["vq", "mq", "ta"])
def test_each_score_reaches_the_lora(wan_folder, score):
    """Each of visual quality, motion quality and text alignment alone sends a nonzero gradient
    through the reward, the spread causal decode and the sampler's last step into the LoRA."""
    weights = {k: float(k == score) for k in ("vq", "mq", "ta")}
    reward = tiny_videoreward(**weights)
    model = load_video_model(str(wan_folder))
    model.enable_checkpointing()
    params = inject_lora(model.unet, 4, targets=model.spec.lora_targets)
    for p in params:  # B = 0 at the start would zero every gradient but B's own
        torch.nn.init.normal_(p, std=0.1)
    cond, uncond = encode_prompts(model, ["a cat", ""]).split(1)
    z_T = torch.randn(1, model.latent_channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, 2, 5.0, 1)
    frames = decode_f_frames(model, z0, 9, 4, None, spread=True, one_at_a_time=True)
    reward(frames, ["a cat"]).sum().backward()
    assert sum(p.grad.abs().sum() for p in params) > 0


def test_train_on_tiny_wan_resumes_exactly(tmp_path):
    """train.py with the tiny VideoReward on the tiny Wan: 4 frames spread over the clip by default
    (config.json records them), and a run cut after one step and resumed ends bit for bit where
    an uncut one does."""
    fast = ["--model", "tiny-wan", "--reward", "tiny_videoreward", "--prompts", "animals.txt", "--num-steps", "2",
            "--frames", "5", "--num-videos", "1", "--eval-every", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(train.main, [*fast, "--max-steps", "2", "--output-dir", str(straight)])
    run_cli(train.main, [*fast, "--max-steps", "1", "--output-dir", str(split)])
    run_cli(train.main, ["--resume", str(split), "--max-steps", "2"])
    assert '"decode_frames": 4' in (straight / "config.json").read_text()
    resumed, reference = load_file(split / "lora.safetensors"), load_file(straight / "lora.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_train_on_tiny_raises_the_held_out_reward(tmp_path):
    """The ModelScope family: per-frame VAE, frames spread over the clip; the held-out reward rises."""
    run_cli(train.main, ["--model", "tiny", "--reward", "tiny_videoreward", "--prompts", "animals.txt",
                         "--num-steps", "2", "--max-steps", "2", "--eval-every", "2", "--eval-videos", "2",
                         "--eval-prompts", "animals_heldout.txt", "--num-videos", "1", "--output-dir", str(tmp_path)])
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["eval_reward"]]
    assert len(rows) == 2 and float(rows[1]["eval_reward"]) > float(rows[0]["eval_reward"])


def test_watched_it_gives_a_column_per_score_from_spread_frames(reward):
    """Under --eval-rewards the three normalised scores and their sum are columns of metrics.csv,
    scored on the frames the reward reads of the whole held-out videos (4 spread over 16 at 8 fps)."""
    from infra.runlog import eval_columns

    videos = torch.rand(2, 16, 3, 28, 28)
    columns = eval_columns({"videoreward": reward}, videos, PROMPTS, fps=8)
    scores = reward.scores(videos[:, spread_frames(16, 4)], PROMPTS)  # (2, 3)
    assert columns.keys() == {f"eval_videoreward/{k}" for k in ("VQ", "MQ", "TA", "sum")}
    assert columns["eval_videoreward/MQ"] == pytest.approx(scores[:, 1].mean().item(), rel=1e-5)
    assert columns["eval_videoreward/sum"] == pytest.approx(scores.sum(1).mean().item(), rel=1e-5)


def test_the_reward_model_leaves_the_device_once_backward_is_done_with_it(monkeypatch):
    """--low-memory (infra.offload.reward_leaves_in_backward): each call brings the reward's modules to the device,
    and the frames' gradient, which exists only once backward has left the reward, sends them to
    host memory; without a gradient (evaluation) they stay."""
    from infra import offload

    moves = []
    monkeypatch.setattr(offload, "move_modules", lambda modules, device: moves.append((len(modules), device)))
    judge = torch.nn.Linear(3, 1)

    def reward(frames, prompts):
        return judge(frames.mean(dim=(1, 3, 4))).squeeze(-1)  # (B,)

    reward.modules, reward.fps, reward.min_frames = [judge], 2, 2
    wrapped = offload.reward_leaves_in_backward(reward, "cuda")
    assert wrapped.fps == 2 and offload.reward_leaves_in_backward(reward, "cpu") is reward
    frames = torch.rand(2, 4, 3, 8, 8, requires_grad=True)
    r = wrapped(frames, ["a", "b"])
    assert moves == [(1, "cuda")]
    r.sum().backward()
    assert moves == [(1, "cuda"), (1, "cpu")] and frames.grad is not None
    with torch.no_grad():
        wrapped(frames, ["a", "b"])
    assert moves == [(1, "cuda"), (1, "cpu"), (1, "cuda")]
