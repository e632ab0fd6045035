"""The model-backed rewards, offline: tiny random miniatures of the released artefacts.

Every release is written at a tiny size in its own format and key names, with every tensor moved
off its initial default (infra.miniature: a dropped bias or a norm left at ones would otherwise
change nothing), saved to a temporary folder or file and loaded through the reward's local-path
option, the same `from_pretrained` / `torch.load` code that a hub id goes through. The checks:
no miniature keeps a default; each reward scores as the release's own code does on the same
miniature (and a planted mapping mistake breaks that); preprocessing parity with the official
processors at the releases' resolutions; every converter refuses a file with a tensor too many or
too few, by name; gradients reach the frames; prompts pair row-wise; one-line UserErrors.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download; must be set before huggingface_hub loads

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers
from transformers import (
    AutoModel, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, Owlv2Config,
    Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor, VideoMAEConfig, VideoMAEForVideoClassification,
    VideoMAEImageProcessor, VJEPA2Config, VJEPA2Model, VJEPA2VideoProcessor, XCLIPConfig, XCLIPModel, XCLIPProcessor,
)  # fmt: skip
from transformers.utils import logging as transformers_logging

from infra.cli import UserError
from infra.miniature import away_from_defaults, defaults_left
from reward_models import image as image_rewards
from reward_models import video as video_rewards
import rewards
from reward_models.common import IMAGENET_MEAN, IMAGENET_STD
from rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewards import load_reward
from toy.judge import Judge


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU the threads wait on each other
    (this file: ~10 s with one thread, ~35 s with two on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#### Miniatures of the releases, saved where the rewards' path options can find them

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
SIZE = 32  # every miniature's input size (the releases: 224; V-JEPA 2 256; OWLv2 960)
LABELS = {0: "playing guitar", 1: "riding a bike", 2: "skiing (not slalom or crosscountry)", 3: "playing"}
PROMPTS = ["a man playing guitar on a stage", "a kid riding a bike in the park", "a woman skiing down a hill"]
ACTIONS = ["playing guitar", "riding a bike", "skiing (not slalom or crosscountry)"]  # the label of each prompt


def tiny_tokenizer(**kwargs):
    """A CLIP tokenizer with no merges: the 256 byte symbols, alone and word-final, plus
    <|startoftext|> (512) and <|endoftext|> (513), the highest ids as in the real vocabulary."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], **kwargs)


TEXT = dict(TINY, vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)
HPS_CONFIG = (  # open_clip's ViT-H-14 layout at width 32; embed_dim = width, so visual.proj is square
    '{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,'
    ' "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,'
    ' "heads": 2, "layers": 1}}'
)


@dataclass
class Release:
    """One file a miniature was saved to: how the release is read and written (its format), and a
    freshly initialised state dict of the same model, for `defaults_left`."""
    read: Callable
    write: Callable
    fresh: dict


SAFETENSORS = dict(read=load_file, write=lambda state, path: save_file(state, path, metadata={"format": "pt"}))
TORCH = dict(read=lambda path: torch.load(path, map_location="cpu", weights_only=True), write=torch.save)
HPS_FILE = dict(read=lambda path: torch.load(path, map_location="cpu", weights_only=True)["state_dict"],
                write=lambda state, path: torch.save({"state_dict": state}, path))  # HPSv2's layout


class Releases(dict):
    """Reward name -> the options that point it at its miniature; `files`: every release file
    written, path -> Release. A miniature saved through `folder` or `file` is in `files`, so
    the tests that walk the releases cover it."""

    def __init__(self, tmp):
        super().__init__()
        self.tmp, self.files, self.seed = tmp, {}, 0

    def miniature(self, build):
        """`build()` with every parameter moved off its default, and a fresh build."""
        self.seed += 1
        torch.manual_seed(self.seed)
        model = away_from_defaults(build(), seed=self.seed)
        torch.manual_seed(1000 + self.seed)  # the fresh build: another draw of the random tensors
        return model, build()

    def folder(self, build, name, tokenizer=None, names=dict):
        """A transformers model folder (config.json, model.safetensors), as on the hub, its tensors
        under the release's names (`names` renames a state dict to them). The fresh state dict is
        a fresh model's, saved and renamed the same way."""
        model, fresh = self.miniature(build)
        for saved, folder in ((model, self.tmp / name), (fresh, self.tmp / "fresh" / name)):
            saved.save_pretrained(folder)
            SAFETENSORS["write"](names(load_file(folder / "model.safetensors")), folder / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp / name)
        self.files[self.tmp / name / "model.safetensors"] = Release(
            **SAFETENSORS, fresh=load_file(self.tmp / "fresh" / name / "model.safetensors"))
        return str(self.tmp / name)

    def file(self, build, name, form, dtype=None):
        """A single weights file in `form` (TORCH, HPS_FILE, SAFETENSORS), as `form` writes it."""
        model, fresh = self.miniature(build)
        state = {k: v if dtype is None else v.to(dtype) for k, v in model.state_dict().items()}
        self.files[self.tmp / name] = Release(**form, fresh=fresh.state_dict())
        form["write"](state, self.tmp / name)
        return str(self.tmp / name)


def videomae_names(state):
    """VideoMAE's release (MCG-NJU's checkpoint, as transformers 4 wrote it) keeps the query and
    value biases apart, as q_bias and v_bias; transformers 5 holds them as query.bias and
    value.bias and renames on load. Written so whatever this transformers' save_pretrained does."""
    return {re.sub(r"attention\.attention\.(q|v)(uery|alue)\.bias$", r"attention.attention.\1_bias", k): v
            for k, v in state.items()}


def release_file(option_value):
    """The weights file behind an option: the file itself, or a folder's model.safetensors."""
    path = Path(option_value)
    return path / "model.safetensors" if path.is_dir() else path


def tiny_owl():
    """OWLv2 whose class head's logit shift and scale start at zero, so its logits start at the
    cosine (random ones saturate the sigmoid); the miniature's noise then moves them off zero."""
    owl = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(TEXT, max_position_embeddings=16),
        vision_config=dict(TINY, image_size=SIZE, patch_size=8), projection_dim=32))  # fmt: skip
    for layer in (owl.class_head.logit_shift, owl.class_head.logit_scale):
        torch.nn.init.zeros_(layer.weight)
    return owl


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Build every miniature once; return the reward options that point at them (`Releases`)."""
    tmp = tmp_path_factory.mktemp("models")
    out = Releases(tmp)
    (tmp / "hps-tiny-test.json").write_text(HPS_CONFIG)
    open_clip.add_model_config(tmp / "hps-tiny-test.json")  # a custom architecture, by name
    # projection_dim 32: the aesthetic head's input (768 in ViT-L/14), and square projections
    clip = out.folder(lambda: CLIPModel(CLIPConfig(
        text_config=TEXT, vision_config=dict(TINY, image_size=SIZE, patch_size=8), projection_dim=32)),
        "clip", tiny_tokenizer())  # fmt: skip
    aesthetic = out.file(lambda: rewards.AestheticHead(32), "aesthetic-model.pth", TORCH)  # keys layers.{0,2,4,6,7}.*
    hps = out.file(lambda: open_clip.create_model("hps-tiny-test"), "HPS_v2.1_compressed.pt", HPS_FILE)
    videomae = out.folder(lambda: VideoMAEForVideoClassification(VideoMAEConfig(
        **TINY, image_size=SIZE, patch_size=8, num_frames=4, tubelet_size=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})), "videomae", names=videomae_names)  # fmt: skip
    owl = out.folder(tiny_owl, "owl", tiny_tokenizer(model_max_length=16))  # OWL's 16-token queries
    xclip = out.folder(lambda: XCLIPModel(XCLIPConfig(
        text_config=TEXT, projection_dim=32, prompt_layers=1, prompt_num_attention_heads=2,
        vision_config=dict(TINY, image_size=SIZE, patch_size=8, num_frames=4, mit_hidden_size=32,
                           mit_intermediate_size=64, mit_num_attention_heads=2))),
        "xclip", tiny_tokenizer())  # fmt: skip
    vjepa = out.folder(lambda: VJEPA2Model(VJEPA2Config(
        crop_size=SIZE, patch_size=8, frames_per_clip=8, tubelet_size=2, hidden_size=48, num_attention_heads=2,
        num_hidden_layers=1, mlp_ratio=2, pred_hidden_size=48, pred_num_attention_heads=2,
        pred_num_hidden_layers=1, num_pooler_layers=1)), "vjepa")  # fmt: skip
    judge = out.file(Judge, "judge.safetensors", SAFETENSORS, torch.float16)  # float16, as toy/train_judge.py writes it
    out.update({
        "aesthetic": dict(weights=aesthetic, clip_model=clip),
        "hps": dict(weights=hps, arch="hps-tiny-test"),
        "pickscore": dict(model=clip, tokenizer=clip),
        "clip": dict(model=clip),
        "actpred": dict(model=videomae),
        "object": dict(model=owl, query="a cat"),
        "video_text": dict(model=xclip),
        "temporal": dict(model=vjepa),
        "toy_judge": dict(weights=judge),
    })
    return out


def frames(b=2, f=4, h=24, w=32, seed=0):
    """A batch of random decoded videos (B, f, 3, H, W) in [0, 1]."""
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_no_miniature_keeps_a_default(paths):
    """Every tensor of every saved release, read back as the release is read, is off its initial
    value: not constant (a zero bias, a unit norm) and not equal to a fresh init (a logit scale)."""
    assert len(paths.files) >= 8  # walks them all: a miniature added later is covered
    written = {release_file(v) for options in paths.values() for k, v in options.items()
               if k in ("weights", "model", "clip_model")}
    assert written <= set(paths.files)  # every file a reward reads was registered
    for path, release in paths.files.items():
        state = release.read(path)
        assert sorted(state) == sorted(release.fresh), path
        assert defaults_left(state, release.fresh) == [], path


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


#### Scores: each reward against the release's own code on the same miniature
# The references load each miniature with the installed library's own classes, the way the
# release's code does (transformers `from_pretrained` and the model's own forward or
# get_*_features, open_clip `create_model_and_transforms` + `load_state_dict`), never through
# reward_models/. Fed the project's own differentiable pixels, only the model mapping is compared:
# float32 on the same ops, the scores agree to within SCORE_TOL (measured: < 1e-6). Fed the
# official processors' pixels (uint8-rounded, clamped), they agree within each reward's
# PROCESSOR_TOL below; the pixel tests above bound those pixels at the releases' resolutions.

SCORE_TOL = 1e-5  # absolute, and relative to the score


def video_frames(b=2, f=4, h=40, w=56, seed=1):
    """Smooth random videos (B, f, 3, H, W) whose values are whole multiples of 1/255, so an official
    processor's uint8 images hold exactly the frames the reward sees; 40 x 56 is cropped or padded."""
    return torch.stack([torch.cat([photo(h, w, seed=100 * seed + 10 * i + j)[1] for j in range(f)]) for i in range(b)])


def pil_images(video):
    """(B, f, 3, H, W) in [0, 1] -> the B * f frames as PIL images."""
    u8 = (video.flatten(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(image) for image in u8]


def our_pixels(kind, video):
    """The project's differentiable preprocessing, at the miniature's size."""
    images = video.flatten(0, 1)  # (B*f, 3, H, W)
    return {
        "clip": lambda: image_rewards.clip_pixels(images, SIZE),
        "hps": lambda: image_rewards.hps_pixels(images, SIZE),
        "owl": lambda: video_rewards.owl_pixels(images, SIZE),
        "video": lambda: video_rewards.video_pixels(video, SIZE, SIZE, torch.float32),
        "vjepa": lambda: video_rewards.video_pixels(video, SIZE * 256 // 224, SIZE, torch.float32),
    }[kind]()


def official_pixels(kind, video):
    """The release's own processor, configured as the release configures it but at the miniature's
    size, on the frames as uint8 images."""
    b, f = video.shape[:2]
    images = pil_images(video)
    clips = [images[i * f : (i + 1) * f] for i in range(b)]
    square = {"height": SIZE, "width": SIZE}
    if kind == "clip":  # openai/clip-vit-large-patch14 (and PickScore's laion CLIP-H processor)
        processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=square)
        return processor(images, return_tensors="pt").pixel_values
    if kind == "hps":  # HPSv2's eval transform: ResizeMaxSize (long side, black padding)
        transform = open_clip.image_transform(SIZE, is_train=False, resize_mode="longest", fill_color=0)
        return torch.stack([transform(image) for image in images])
    if kind == "owl":
        return Owlv2ImageProcessor(size=square)(images, return_tensors="pt").pixel_values
    if kind == "video":  # MCG-NJU/videomae-base-finetuned-kinetics, microsoft/xclip-base-patch32
        processor = VideoMAEImageProcessor(size={"shortest_edge": SIZE}, crop_size=square,
                                           image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return processor(clips, return_tensors="pt").pixel_values
    if kind == "vjepa":  # facebook/vjepa2-vitl-fpc64-256: short side crop * 256 / 224
        u8 = (video * 255).round().to(torch.uint8)
        processor = VJEPA2VideoProcessor(size={"shortest_edge": SIZE * 256 // 224}, crop_size=square)
        return processor(list(u8), return_tensors="pt").pixel_values_videos
    raise KeyError(kind)


def embedding(output):
    """get_image_features / get_text_features: a tensor (transformers 4), or an output whose
    pooler_output is the projected embedding (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def unit(x):
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def ref_aesthetic(options, pixels, prompts, b, f):
    """trl's DDPO aesthetic scorer (the LAION predictor's recipe): the whole CLIPModel's
    get_image_features, divided by its norm, through the MLP, written out here from the file's
    tensors: Linear layers 0, 2, 4, 6, 7 (dropouts between, idle in eval)."""
    clip = CLIPModel.from_pretrained(options["clip_model"]).eval()
    mlp = torch.load(options["weights"], map_location="cpu", weights_only=True)
    x = unit(embedding(clip.get_image_features(pixel_values=pixels)))  # (B*f, 32)
    for i in (0, 2, 4, 6, 7):
        x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    return x.view(b, f).mean(dim=1)


def ref_hps(options, pixels, prompts, b, f):
    """HPSv2's img_score.py: create_model_and_transforms, load_state_dict(checkpoint["state_dict"]),
    model(image, text) with output_dict, the diagonal of image_features @ text_features.T."""
    model, _, _ = open_clip.create_model_and_transforms(options["arch"], pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(options["weights"], map_location="cpu", weights_only=True)["state_dict"])
    tokenizer = open_clip.get_tokenizer(options["arch"])
    scores = []
    for i in range(b):
        out = model.eval()(pixels[i * f : (i + 1) * f], tokenizer([prompts[i]]))
        scores.append((out["image_features"] @ out["text_features"].T)[:, 0].mean())  # frames of video i vs prompt i
    return torch.stack(scores)


def ref_pickscore(options, pixels, prompts, b, f):
    """PickScore's README: AutoModel, get_image_features / get_text_features divided by their norms,
    logit_scale.exp() * text @ image."""
    model = AutoModel.from_pretrained(options["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(options["tokenizer"])
    scores = []
    for i in range(b):
        text = tokenizer([prompts[i]], padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = unit(embedding(model.get_image_features(pixel_values=pixels[i * f : (i + 1) * f])))
        text_embs = unit(embedding(model.get_text_features(**text)))
        scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T))[0].mean())
    return torch.stack(scores)


def ref_clip(options, pixels, prompts, b, f):
    """CLIPModel's own forward: logits_per_image / logit_scale.exp() is the cosine."""
    model = CLIPModel.from_pretrained(options["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(options["model"])
    scores = []
    for i in range(b):
        out = model(**tokenizer([prompts[i]], return_tensors="pt"), pixel_values=pixels[i * f : (i + 1) * f])
        scores.append((out.logits_per_image[:, 0] / model.logit_scale.exp()).mean())
    return torch.stack(scores)


def ref_actpred(options, pixels, prompts, b, f):
    """VideoMAE's model card: VideoMAEForVideoClassification(pixel_values).logits; the probability
    of each prompt's action, looked up in the config's label2id."""
    model = VideoMAEForVideoClassification.from_pretrained(options["model"]).eval()
    target = torch.tensor([model.config.label2id[ACTIONS[PROMPTS.index(p)]] for p in prompts])
    return model(pixel_values=pixels).logits.softmax(dim=-1)[torch.arange(b), target]


def ref_object(options, pixels, prompts, b, f):
    """OWLv2's docs: Owlv2Processor's text (padded to the tokenizer's 16), Owlv2ForObjectDetection;
    sigmoid of the query's logit, the most confident box, mean over frames."""
    model = Owlv2ForObjectDetection.from_pretrained(options["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(options["model"])
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tokenizer)
    text = processor(text=[[options["query"]]] * (b * f), return_tensors="pt")  # one query per frame
    logits = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels).logits
    return logits[..., 0].sigmoid().amax(dim=1).view(b, f).mean(dim=1)


def ref_video_text(options, pixels, prompts, b, f):
    """X-CLIP's docs: XCLIPModel(input_ids, pixel_values).logits_per_video, each video alone with
    its prompt (the text is conditioned on the video)."""
    model = XCLIPModel.from_pretrained(options["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(options["model"])
    processor = XCLIPProcessor(image_processor=VideoMAEImageProcessor(), tokenizer=tokenizer)
    scores = []
    for i in range(b):
        text = processor(text=[prompts[i]], padding=True, return_tensors="pt")
        scores.append(model(**text, pixel_values=pixels[i : i + 1]).logits_per_video[0, 0])
    return torch.stack(scores)


def ref_temporal(options, pixels, prompts, b, f):
    """No release code scores with V-JEPA 2 (the reward is the project's own): the reference is its
    definition on VJEPA2Model's own parts. The encoder (forward with skip_predictor) on the first
    half of the clip; the predictor, as V-JEPA 2's training calls it, from those tokens to the
    second half's positions; against the encoder's output on the whole clip at those positions,
    layer-normalised (written out here); -mean L1. (VJEPA2Model's full forward reads its targets
    from the same encoder pass as its context, so it cannot keep the future from the context.)"""
    model = VJEPA2Model.from_pretrained(options["model"]).eval()
    steps, per_step = f // 2, (SIZE // 8) ** 2  # tubelets of 2 frames, 8 px patches
    cut = steps // 2 * per_step  # context tokens: the first half of the time steps
    ids = torch.arange(steps * per_step).expand(b, -1)
    context = model(pixel_values_videos=pixels[:, : steps // 2 * 2], skip_predictor=True).last_hidden_state
    pred = model.predictor(encoder_hidden_states=context, context_mask=[ids[:, :cut]],
                           target_mask=[ids[:, cut:]]).last_hidden_state  # fmt: skip
    whole = model(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state[:, cut:]
    target = (whole - whole.mean(-1, keepdim=True)) / (whole.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    return -(pred - target).abs().mean(dim=(1, 2))


# reward -> (its preprocessing, the reference scorer, PROCESSOR_TOL: the absolute tolerance on the
# official processor's pixels of 40 x 56 frames, 3-5x the difference measured on these miniatures:
# aesthetic 2e-5, hps 2e-5, pickscore 2e-3 (a score ~14 x cos), clip 1e-4, actpred 4e-5, object 1e-7
# (24 x 24 frames: OWLv2's padding colour is a documented difference), video_text 3e-2 (the tiny
# X-CLIP is that sensitive to the processor's uint8 rounding), temporal 1e-4.)
REFERENCES = {
    "aesthetic": ("clip", ref_aesthetic, 1e-4),
    "hps": ("hps", ref_hps, 2e-4),
    "pickscore": ("clip", ref_pickscore, 1e-2),
    "clip": ("clip", ref_clip, 1e-3),
    "actpred": ("video", ref_actpred, 2e-4),
    "object": ("owl", ref_object, 1e-5),
    "video_text": ("video", ref_video_text, 0.1),
    "temporal": ("vjepa", ref_temporal, 1e-3),
}
ALL = list(REFERENCES)


def assert_scores_match(ours, ref, tol=SCORE_TOL):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def built(paths):
    return {name: load_reward(name, **paths[name]) for name in ALL}


@pytest.fixture(scope="module")
def reference_scores(paths):
    """name -> {"video", "prompts", "square" (frames at the model's own size): the inputs; "ours":
    the reference's scores on our pixels of "video", "official": on the official processor's pixels
    of "video", "official square": of "square"}."""
    out = {}
    with torch.no_grad():
        for name, (kind, ref, _) in REFERENCES.items():
            video = video_frames(h=24, w=24) if kind == "owl" else video_frames()  # OWL: no padding, upsampled
            square, prompts = video_frames(h=SIZE, w=SIZE, seed=2), PROMPTS[:2]
            score = lambda pixels: ref(paths[name], pixels, prompts, *video.shape[:2])  # noqa: E731
            out[name] = dict(video=video, prompts=prompts, square=square, ours=score(our_pixels(kind, video)),
                             official=score(official_pixels(kind, video)),
                             official_square=score(official_pixels(kind, square)))
    return out


@pytest.mark.parametrize("name", ALL)
def test_score_matches_the_release_code(built, reference_scores, name):
    """The reward equals the release's own code on the same miniature and frames:
    - on the project's pixels (only the model mapping compared): to SCORE_TOL = 1e-5;
    - on the official processor's pixels of frames at the model's own size, where no processor
      resamples (V-JEPA 2's still does, to 36 then a 32 crop: 1e-3): to 1e-5 too;
    - on the official processor's pixels of 40 x 56 frames (crop or pad, resample, uint8
      rounding): to the reward's PROCESSOR_TOL (REFERENCES)."""
    ref = reference_scores[name]
    with torch.no_grad():
        ours, square = built[name](ref["video"], ref["prompts"]), built[name](ref["square"], ref["prompts"])
    assert_scores_match(ours, ref["ours"])
    assert_scores_match(square, ref["official_square"], tol=1e-3 if name == "temporal" else SCORE_TOL)
    assert (ours - ref["official"]).abs().max() <= REFERENCES[name][2], (ours, ref["official"])
    assert ours.std() > 10 * SCORE_TOL  # the two videos score apart: a constant score would pass anything


#### Planted mistakes: a wrong mapping of one tensor fails the score parity
# Each reward's converter (load_pretrained / load_checkpoint, as its module calls it) is wrapped to
# hand back its model with one mistake a key mapping can make: a bias dropped (left at zero), a
# square projection transposed, a norm dropped (weight ones, bias zeros).

PLANTS = {  # reward -> (a bias, a square projection, a norm)
    "aesthetic": ("layers.0.bias", "visual_projection.weight", "vision_model.post_layernorm"),
    "hps": ("visual.transformer.resblocks.0.mlp.c_proj.bias", "visual.proj", "visual.ln_post"),
    "pickscore": ("text_model.encoder.layers.0.mlp.fc2.bias", "text_projection.weight", "text_model.final_layer_norm"),
    "clip": ("vision_model.encoder.layers.0.self_attn.out_proj.bias", "visual_projection.weight",
             "vision_model.pre_layrnorm"),  # sic: transformers' CLIP name
    "actpred": ("classifier.bias", "videomae.encoder.layer.0.attention.output.dense.weight", "fc_norm"),
    "object": ("class_head.dense0.bias", "owlv2.text_projection.weight", "layer_norm"),
    "video_text": ("mit.encoder.layers.0.mlp.fc2.bias", "visual_projection.weight", "vision_model.post_layernorm"),
    "temporal": ("predictor.proj.bias", "predictor.embeddings.predictor_embeddings.weight", "encoder.layernorm"),
}
MISTAKES = ["bias dropped", "projection transposed", "norm dropped"]


def wrap_converters(monkeypatch, after):
    """Wrap every converter the rewards call (load_pretrained, load_checkpoint, under the names each
    reward module imported them by) so that `after(model)` sees each model it hands back."""

    def wrap(convert):
        def converter(*args, **kwargs):
            model = convert(*args, **kwargs)
            after(args[0] if model is None else model)  # load_checkpoint fills its first argument
            return model

        return converter

    for module in (rewards, image_rewards, video_rewards):
        for name in ("load_pretrained", "load_checkpoint"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, wrap(getattr(module, name)))


def plant(monkeypatch, mistake, key):
    """Make every converter hand back its model with `mistake` at the tensor `key`; returns the
    list that records each model it was planted in."""
    planted = []

    @torch.no_grad()
    def spoil(model):
        params = dict(model.named_parameters())
        if mistake == "bias dropped" and key in params:
            params[key].zero_()
        elif mistake == "projection transposed" and key in params:
            params[key].copy_(params[key].T.clone())
        elif mistake == "norm dropped" and f"{key}.weight" in params:
            params[f"{key}.weight"].fill_(1)
            params[f"{key}.bias"].zero_()
        else:
            return
        planted.append(type(model).__name__)

    wrap_converters(monkeypatch, spoil)
    return planted


@pytest.mark.parametrize("mistake", MISTAKES)
@pytest.mark.parametrize("name", ALL)
def test_a_planted_mapping_mistake_fails_the_score_parity(paths, reference_scores, monkeypatch, name, mistake):
    ref = reference_scores[name]
    planted = plant(monkeypatch, mistake, PLANTS[name][MISTAKES.index(mistake)])
    reward = load_reward(name, **paths[name])
    assert len(planted) == 1  # the tensor exists, in exactly one of the reward's models
    with torch.no_grad():
        ours = reward(ref["video"], ref["prompts"])
    with pytest.raises(AssertionError):
        assert_scores_match(ours, ref["ours"])
    change = (ours - ref["ours"]).abs().max().item()
    print(f"planted in {name}: {mistake}, max |score change| {change:.3g}")  # shown with pytest -rP
    assert change > 10 * SCORE_TOL, change  # far outside the tolerance, not at its edge


TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")  # in the CLIP file, unread by the aesthetic reward


@pytest.mark.parametrize("name", ALL)
def test_every_released_tensor_reaches_the_reward_unchanged(paths, monkeypatch, name):
    """Matched by value, not by name (every tensor of a miniature is distinct): each parameter of
    the models a reward loads equals a tensor of its release files, and each tensor of those files
    is one of them. So no converter, the project's or transformers' own (VideoMAE's q_bias ->
    query.bias), dropped, zeroed, transposed or merged one, which the parity with transformers'
    own loading could not see. The aesthetic reward leaves CLIP's text tower unread, on purpose."""
    models = []
    wrap_converters(monkeypatch, models.append)
    load_reward(name, **paths[name])
    params = [(f"{type(m).__name__}:{k}", p) for m in models for k, p in m.named_parameters()]
    files = {release_file(v) for k, v in paths[name].items() if k in ("weights", "model", "clip_model")}
    released = [(f"{f.parent.name}/{f.name}:{k}", t) for f in files for k, t in paths.files[f].read(f).items()
                if not (name == "aesthetic" and f.suffix == ".safetensors" and k.startswith(TEXT_TOWER))]

    def same(a, b):
        return a.shape == b.shape and torch.equal(a.float(), b.float())

    assert len(params) > 10 and len(released) > 10
    assert [k for k, t in released if not any(same(t, p) for _, p in params)] == []  # read, unchanged
    assert [k for k, p in params if not any(same(p, t) for _, t in released)] == []  # from the file


#### Converters: the real key layouts load; a tensor too many, too few or of another shape is
#### refused by name, in one line

REFUSED = [  # reward, the option naming the release, a tensor of it to drop, its name in the model
    ("aesthetic", "weights", "layers.4.bias", None),  # load_checkpoint
    ("aesthetic", "clip_model", "vision_model.post_layernorm.bias", None),  # the vision tower of a whole CLIP
    ("hps", "weights", "visual.ln_post.bias", None),  # load_checkpoint under "state_dict"
    ("clip", "model", "text_projection.weight", None),  # load_pretrained(CLIPModel), also PickScore's
    ("actpred", "model", "videomae.encoder.layer.0.attention.attention.q_bias",  # renamed by transformers
     "videomae.encoder.layer.0.attention.attention.query.bias"),
    ("object", "model", "box_head.dense0.bias", None),
    ("video_text", "model", "prompts_generator.alpha", None),
    ("temporal", "model", "predictor.embeddings.mask_tokens", None),
    ("toy_judge", "weights", "motion_head.bias", None),  # toy/judge.py's load_judge
]


def broken_copy(paths, tmp_path, name, option, edit):
    """The options of `name` with `option` pointing at a copy of its release, `edit`ed in its format."""
    source = Path(paths[name][option])
    copy = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    release = paths.files[release_file(source)]
    state = release.read(release_file(copy))
    edit(state)
    release.write(state, release_file(copy))
    return paths[name] | {option: str(copy)}


@pytest.mark.parametrize("name, option, dropped, named", REFUSED)
def test_a_release_with_a_tensor_too_many_and_one_too_few_is_refused_by_name(paths, tmp_path, name, option, dropped,
                                                                               named):
    def edit(state):
        state["extra.weight"] = state.pop(dropped).clone()  # the tensor under a name the model lacks

    options = broken_copy(paths, tmp_path, name, option, edit)
    with pytest.raises(UserError) as error:
        load_reward(name, **options)
    message, named = str(error.value), named or dropped
    assert "\n" not in message and named in message and "extra.weight" in message, message
    assert message.index("missing") < message.index(named) < message.index("unexpected") < message.index("extra.weight")


@pytest.mark.parametrize("name, option, key", [
    ("aesthetic", "weights", "layers.2.weight"), ("hps", "weights", "visual.proj"),
    ("clip", "model", "visual_projection.weight"), ("toy_judge", "weights", "appearance_head.weight")])  # fmt: skip
def test_a_release_tensor_of_another_shape_is_refused_by_name(paths, tmp_path, name, option, key):
    def edit(state):
        state[key] = state[key][..., :-1].clone()

    options = broken_copy(paths, tmp_path, name, option, edit)
    with pytest.raises(UserError, match=f"other shapes.*{key}"):
        load_reward(name, **options)


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


def test_loading_leaves_transformers_logging_as_it_was(paths):
    """The converters quieten transformers' load report while they check the keys themselves, and
    only then: the aesthetic reward used to set the whole process's verbosity to errors."""
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_info()
    try:
        load_reward("aesthetic", **paths["aesthetic"])
        assert transformers_logging.get_verbosity() == transformers_logging.INFO
    finally:
        transformers_logging.set_verbosity(before)


#### Every reward: gradient reaches the frames, prompts pair row-wise

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
