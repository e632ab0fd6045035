"""The model-backed rewards, offline: tiny random models built from small configs.

Every model is saved to a temporary folder or file and loaded through the reward's local-path
option, the same `from_pretrained` / `torch.load` code that a hub id goes through. Four kinds
of checks: preprocessing parity with the official processors, gradients reaching the frames,
row-wise prompt pairing, and one-line UserErrors for bad input.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download; must be set before huggingface_hub loads

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection,
    Owlv2ImageProcessor, VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEImageProcessor,
    VJEPA2Config, VJEPA2Model, VJEPA2VideoProcessor, XCLIPConfig, XCLIPModel, XCLIPProcessor,
)  # fmt: skip

from infra.cli import UserError
from reward_models import image as image_rewards
from reward_models import video as video_rewards
import rewards
from reward_models.common import IMAGENET_MEAN, IMAGENET_STD
from rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewards import load_reward


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU the threads wait on each other
    (this file: ~10 s with one thread, ~35 s with two on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#### Tiny models, saved where the rewards' path options can find them

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
LABELS = {0: "playing guitar", 1: "riding a bike", 2: "skiing (not slalom or crosscountry)", 3: "playing"}
PROMPTS = ["a man playing guitar on a stage", "a kid riding a bike in the park", "a woman skiing down a hill"]


def tiny_tokenizer():
    """A CLIP tokenizer with no merges: the 256 byte symbols, alone and word-final, plus
    <|startoftext|> (512) and <|endoftext|> (513), the highest ids as in the real vocabulary."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[])


TEXT = dict(TINY, vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def save(model, folder, tokenizer=True):
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Build every tiny model once; return the reward options that point at them."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("models")
    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=dict(TINY, image_size=32, patch_size=8),
                                projection_dim=768))  # 768: the aesthetic head's input
    head = rewards.AestheticHead()
    torch.save(head.state_dict(), tmp / "aesthetic.pth")
    (tmp / "hps-tiny-test.json").write_text(
        '{"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,'
        ' "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,'
        ' "heads": 2, "layers": 1}}'
    )
    open_clip.add_model_config(tmp / "hps-tiny-test.json")  # a custom architecture, by name
    torch.save({"state_dict": open_clip.create_model("hps-tiny-test").state_dict()}, tmp / "hps.pt")
    videomae = VideoMAEForVideoClassification(VideoMAEConfig(
        **TINY, image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))  # fmt: skip
    owl = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(TEXT, max_position_embeddings=16),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=32))  # fmt: skip
    for layer in (owl.class_head.logit_shift, owl.class_head.logit_scale):
        torch.nn.init.zeros_(layer.weight)  # logits = cosine: random ones saturate the sigmoid
    xclip = XCLIPModel(XCLIPConfig(
        text_config=TEXT, projection_dim=32, prompt_layers=1, prompt_num_attention_heads=2,
        vision_config=dict(TINY, image_size=32, patch_size=8, num_frames=4, mit_hidden_size=32,
                           mit_intermediate_size=64, mit_num_attention_heads=2)))  # fmt: skip
    vjepa = VJEPA2Model(VJEPA2Config(
        crop_size=32, patch_size=8, frames_per_clip=8, tubelet_size=2, hidden_size=48, num_attention_heads=2,
        num_hidden_layers=1, mlp_ratio=2, pred_hidden_size=48, pred_num_attention_heads=2,
        pred_num_hidden_layers=1, num_pooler_layers=1))  # fmt: skip
    clip_dir = save(clip, tmp / "clip")
    return {
        "aesthetic": dict(weights=str(tmp / "aesthetic.pth"), clip_model=clip_dir),
        "hps": dict(weights=str(tmp / "hps.pt"), arch="hps-tiny-test"),
        "pickscore": dict(model=clip_dir, tokenizer=clip_dir),
        "clip": dict(model=clip_dir),
        "actpred": dict(model=save(videomae, tmp / "videomae", tokenizer=False)),
        "object": dict(model=save(owl, tmp / "owl"), query="a cat"),
        "video_text": dict(model=save(xclip, tmp / "xclip")),
        "temporal": dict(model=save(vjepa, tmp / "vjepa", tokenizer=False)),
    }


def frames(b=2, f=4, h=24, w=32, seed=0):
    """A batch of random decoded videos (B, f, 3, H, W) in [0, 1]."""
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


#### Preprocessing parity with the official processors
# Tolerances are in normalised units (pixel / std, std ~0.26, so 0.01 ~ 0.7/255 of a pixel). The
# official processors round the resized image to uint8: up to 0.5/255 per pixel, ~0.01 after
# normalisation, plus small differences between uint8 (PIL, torchvision) and float filter code
# (measured: 0.018 for bilinear). Bicubic adds overshoot at edges,
# which the processors clamp to [0, 255] and we keep: a few pixels differ by up to ~7/255 (0.1).


def photo(h, w, seed=0):
    """A smooth random image with mild noise, as uint8 (H, W, 3) and as float (1, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")
    u8 = ((x + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)
    return u8[0].permute(1, 2, 0).numpy(), u8.float() / 255


def assert_close(ours, ref, max_err, mean_err=0.01):
    assert ours.shape == ref.shape
    err = (ours - ref).abs()
    assert err.max() <= max_err and err.mean() <= mean_err, (err.max().item(), err.mean().item())


def test_clip_pixels_match_clip_image_processor():
    """CLIP ViT-L/14, PickScore (laion CLIP-H processor): short side 224 bicubic, centre crop."""
    image, x = photo(200, 300)
    ref = CLIPImageProcessor()(Image.fromarray(image), return_tensors="pt").pixel_values
    assert_close(image_rewards.clip_pixels(x, 224), ref, max_err=0.1)


def test_hps_pixels_match_open_clip_transform():
    """HPSv2: long side 224 bicubic, black padding to 224 x 224 (open_clip resize_mode "longest")."""
    image, x = photo(200, 300)
    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    assert_close(image_rewards.hps_pixels(x, 224), transform(Image.fromarray(image))[None], max_err=0.1)


def test_video_pixels_match_videomae_and_xclip_processors():
    """Both checkpoints' processors: VideoMAEImageProcessor, short side 224 bilinear, ImageNet."""
    clip = [photo(200, 300, seed) for seed in range(3)]
    video = torch.cat([x for _, x in clip])[None]  # (1, 3, 3, 200, 300)
    ours = video_rewards.video_pixels(video, 224, 224, torch.float32)  # (1, 3, 3, 224, 224)
    hub = VideoMAEImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)  # hub config
    pil = [Image.fromarray(image) for image, _ in clip]
    assert_close(ours, hub(pil, return_tensors="pt").pixel_values, max_err=0.03)
    xclip = XCLIPProcessor(image_processor=hub, tokenizer=tiny_tokenizer())
    assert_close(ours, xclip(videos=pil, return_tensors="pt").pixel_values, max_err=0.03)


def test_video_pixels_match_vjepa2_video_processor():
    """V-JEPA 2: short side 292 (= 256 * 256 / 224) bilinear, centre crop 256, ImageNet."""
    clip = [photo(200, 300, seed) for seed in range(3)]
    video = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _ in clip])  # (3, 3, H, W)
    ref = VJEPA2VideoProcessor()(video, return_tensors="pt").pixel_values_videos
    ours = video_rewards.video_pixels(torch.cat([x for _, x in clip])[None], 292, 256, torch.float32)
    assert_close(ours, ref, max_err=0.03)


def test_owl_pixels_match_owlv2_image_processor():
    """OWLv2: pad to square, resize to 960 (upsampling: no blur, so the match is exact)."""
    image, x = photo(120, 160)
    ref = Owlv2ImageProcessor()(Image.fromarray(image), return_tensors="pt").pixel_values
    # transformers 5 pads black, older versions and OWLv2 itself grey: read it off a padded pixel.
    pad = ref[0, :, -1, -1] * torch.tensor(OPENAI_CLIP_STD) + torch.tensor(OPENAI_CLIP_MEAN)
    pad_value = round(pad[0].item(), 1)
    assert pad_value in (0.0, 0.5) and torch.allclose(pad, torch.full((3,), pad_value), atol=1e-4)
    assert_close(video_rewards.owl_pixels(x, 960, pad_value=pad_value), ref, max_err=1e-4)


#### Every reward: gradient reaches the frames, prompts pair row-wise

ALL = ["aesthetic", "hps", "pickscore", "clip", "actpred", "object", "video_text", "temporal"]


@pytest.fixture(scope="module")
def built(paths):
    return {name: load_reward(name, **paths[name]) for name in ALL}


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_frames(built, name):
    video = frames().requires_grad_(True)
    r = built[name](video, PROMPTS[:2])
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["pickscore", "hps", "clip", "video_text", "object", "actpred"])
def test_prompts_pair_row_wise(built, name):
    """Video i is scored with prompt i: permuting the prompts gives, for every video, the score
    it gets alone with its new prompt (VADER's PickScore used prompt 0 for every video)."""
    video, perm = frames(b=3), [2, 0, 1]
    shuffled = [PROMPTS[k] for k in perm]
    batch = built[name](video, shuffled)
    alone = torch.cat([built[name](video[i : i + 1], [shuffled[i]]) for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
    if name != "object":  # the object query comes from the options, not the prompts
        assert not torch.allclose(batch, built[name](video, PROMPTS), rtol=1e-4, atol=1e-5)


def test_aesthetic_loads_only_the_vision_tower_and_scores_as_the_whole_clip(paths, built):
    """The reward loads CLIP's vision tower and projection alone; its score equals the head on the
    whole CLIPModel's `get_image_features`, the LAION predictor's recipe."""
    clip = CLIPModel.from_pretrained(paths["aesthetic"]["clip_model"]).eval()
    head = rewards.AestheticHead()
    head.load_state_dict(torch.load(paths["aesthetic"]["weights"], weights_only=True))
    frames = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, f, 3, H, W)
    with torch.no_grad():
        embeds = image_rewards.pooled(clip.get_image_features(pixel_values=image_rewards.clip_pixels(frames.flatten(0, 1), 32)))
        expected = head.eval()(F.normalize(embeds, dim=-1)).view(2, 3).mean(dim=1)
        torch.testing.assert_close(built["aesthetic"](frames, PROMPTS[:2]), expected)


def test_actpred_reads_labels_and_log_prob(paths, built):
    assert video_rewards.find_action("A man Playing Guitar!", LABELS) == 0  # longest match wins
    assert video_rewards.find_action("skiing fast", LABELS) == 2  # parentheses are dropped
    video = frames()
    by_label = load_reward("actpred", label="riding a bike", log_prob=True, **paths["actpred"])
    from_prompt = built["actpred"](video, [PROMPTS[1]] * 2)
    torch.testing.assert_close(by_label(video, ["no action here"] * 2).exp(), from_prompt)
    assert built["actpred"].min_frames == 2 and built["temporal"].min_frames == 4
    two = load_reward("actpred", num_frames=2, **paths["actpred"])  # VADER's way: the model's
    assert two(frames(f=2), PROMPTS[:2]).shape == (2,)  # clip length set to the decoded count


def test_object_remove_is_one_minus_presence(paths, built):
    video = frames()
    removed = load_reward("object", remove=True, **paths["object"])
    torch.testing.assert_close(removed(video, PROMPTS[:2]), 1 - built["object"](video, PROMPTS[:2]))


def test_weighted_sums(paths, built):
    video = frames()
    qualified = {f"{n}.{k}": v for n in ("aesthetic", "hps") for k, v in paths[n].items()}
    mix = load_reward("aesthetic:1.0,hps:2.0", **qualified)
    expected = built["aesthetic"](video, PROMPTS[:2]) + 2 * built["hps"](video, PROMPTS[:2])
    torch.testing.assert_close(mix(video, PROMPTS[:2]), expected)
    vader = load_reward("aesthetic_hps", **qualified)
    expected = 0.075 * built["aesthetic"](video, PROMPTS[:2]) + 0.5 * built["hps"](video, PROMPTS[:2])
    torch.testing.assert_close(vader(video, PROMPTS[:2]), expected)
    plain_and_qualified = {"video_text.model": paths["video_text"]["model"], "model": paths["clip"]["model"]}
    both = load_reward("clip:1,video_text:1", **plain_and_qualified)  # "video_text.model" wins
    assert both(video, PROMPTS[:2]).shape == (2,)


def test_half_precision_runs(paths):
    r = load_reward("clip", dtype=torch.bfloat16, **paths["clip"])(frames(), PROMPTS[:2])
    assert r.dtype == torch.float32 and torch.isfinite(r).all()


#### Checkpoints: the real key layouts load, others are refused in one line


def test_checkpoint_layouts(paths, tmp_path):
    aes, hps = paths["aesthetic"], paths["hps"]
    torch.save({"mlp.0.weight": torch.zeros(1024, 768)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="key layout"):
        load_reward("aesthetic", **(aes | {"weights": str(tmp_path / "bad.pth")}))
    torch.save(torch.load(hps["weights"])["state_dict"], tmp_path / "flat.pt")  # no "state_dict" key
    with pytest.raises(UserError, match="under 'state_dict'"):
        load_reward("hps", **(hps | {"weights": str(tmp_path / "flat.pt")}))
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="key layout"):
        load_reward("hps", **(hps | {"weights": str(tmp_path / "wrong.pt")}))
    torch.save({"state_dict": object()}, tmp_path / "code.pt")  # weights_only refuses objects
    with pytest.raises(UserError, match="holds something other than tensors and numbers; it was not loaded"):
        load_reward("hps", **(hps | {"weights": str(tmp_path / "code.pt")}))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "wrong.pt").read_bytes()[:100])  # a download cut short
    with pytest.raises(UserError, match="is not a readable torch file"):
        load_reward("hps", **(hps | {"weights": str(tmp_path / "cut.pt")}))


#### Bad input: one line that names the problem and the fix


@pytest.mark.parametrize("name, options, match", [
    ("nope", {}, "unknown reward 'nope'; known rewards: .*aesthetic"),
    ("aesthetic:1,nope:2", {}, "unknown reward 'nope'"),
    ("hps:lots", {}, "weight 'lots'.*is not a number"),
    ("object", {}, "needs a text query: pass query="),
    ("aesthetic", {"weights": "/no/such/aesthetic.pth"}, "no such file"),
    ("clip", {"model": "/no/such/folder"}, "neither an existing folder nor a hub id"),
    ("clip", {"model": "vader-tests/no-such-model"}, "cannot load .*set model= to a downloaded"),
    ("hps", {"version": "v3"}, "version='v3' is unknown"),
    ("hps", {"arch": "ViT-Nope"}, "not an open_clip architecture"),
    ("clip", {"temperature": 1}, "takes no option temperature"),
    ("clip:1,hps:1", {"temperature": 1}, "no term .* takes option 'temperature'"),
    ("clip:1,hps:1", {"pickscore.model": "x/y"}, "names no term"),
])  # fmt: skip
def test_bad_input_is_a_user_error(name, options, match):
    with pytest.raises(UserError, match=match):
        load_reward(name, **options)


def test_bad_actpred_input(paths, built):
    with pytest.raises(UserError, match="needs 2\\+ decoded frames"):
        built["actpred"](frames(f=1), PROMPTS[:2])
    with pytest.raises(UserError, match="names no Kinetics-400 action.*label="):
        built["actpred"](frames(), ["a sunset over the sea", PROMPTS[0]])
    with pytest.raises(UserError, match="not a label of this model; close ones: playing guitar"):
        load_reward("actpred", label="playing guitars", **paths["actpred"])
    with pytest.raises(UserError, match="needs 4\\+ decoded frames"):
        built["temporal"](frames(f=3), PROMPTS[:2])
