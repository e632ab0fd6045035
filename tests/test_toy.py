"""The toy world: its data, its detector, its rewards, the learned judge, the committed
pretrained model, and a short alignment of that model with train.py as the README's CPU demo
runs it."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_scripts import read_metrics

import models
import train
from infra.cli import UserError, run_cli
from infra.files import PROMPTS_DIR, read_prompts
from models import load_video_model
from rewards import load_eval_rewards, load_reward
from toy import evaluate as toy_evaluate
from toy import pretrain as pretrain_toy
from toy import train_judge
from toy import world as toy
from toy.evaluate import sample_model
from toy.judge import ATTRIBUTES, JUDGE_FILE, NAIVE_JUDGE_FILE, UNHARDENED_JUDGE_FILE, classify, load_judge

# What the base model's samples must reach on the detector, per attribute, well above chance
# (toy.CHANCE: colour 0.25, shape 0.33, size 0.5, direction 0.25). BENCHMARKS.md has the
# accuracies measured on more samples.
FLOORS = {"colour": 0.8, "shape": 0.66, "size": 0.9, "direction": 0.7}
# What the committed judge must read right on rendered clips of every pair; BENCHMARKS.md has
# its accuracies on more clips, on VAE reconstructions and on the base model's samples.
JUDGE_FLOORS = {"colour": 0.98, "shape": 0.9, "size": 0.98, "direction": 0.98}


def clip_video(caption, seed=0):
    clip = toy.Clip.parse(caption)
    return toy.render(clip, toy.random_start(clip, torch.Generator().manual_seed(seed)))  # (F, 3, H, W)


def test_dataset_is_deterministic_and_respects_the_split():
    (a, ca), (b, cb) = next(toy.batches(6, seed=3)), next(toy.batches(6, seed=3))
    assert a.shape == (6, toy.FRAMES, 3, toy.SIZE, toy.SIZE) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, next(toy.batches(6, seed=4))[0])
    seen = {c for _, (_, caps) in zip(range(20), toy.batches(32, seed=0)) for c in caps}
    held = {c.caption for c in toy.all_clips("heldout")}
    assert not seen & held and len(held) == 8 * len(toy.HELDOUT)
    assert all(toy.Clip.parse(c).caption == c for c in seen)
    assert set(read_prompts("toy_heldout.txt")) == held
    assert not set(read_prompts("toy.txt")) & held


def test_detector_reads_rendered_clips():
    videos, captions = next(toy.batches(64, seed=5))
    acc = toy.accuracy(videos, captions)
    assert min(acc.values()) >= 0.95, acc
    blank = torch.full((toy.FRAMES, 3, toy.SIZE, toy.SIZE), toy.BACKGROUND[0])
    assert toy.detect(blank) is None


def test_toy_rewards_measure_what_they_name():
    red, green = clip_video("a big red circle moving left"), clip_video("a big green circle moving left")
    small = clip_video("a small red circle moving left")
    frames = torch.stack([red, green, small]).requires_grad_(True)  # (3, F, 3, H, W)
    r = {name: load_reward(name)(frames, [""] * 3) for name in ("redness", "size", "contrast", "motion")}
    redness = load_reward("redness")
    assert r["redness"][0] > 0.95 and r["redness"][1] < 0.3
    faded = toy.BACKGROUND[0] + 0.5 * (green - toy.BACKGROUND[0])  # half way to the background
    assert redness(faded[None], [""]).item() == pytest.approx(r["redness"][1].item(), abs=0.01)
    assert r["size"][0] > 2 * r["size"][2] and r["size"][0].item() == pytest.approx(r["size"][1].item(), rel=0.05)
    assert r["motion"].tolist() == pytest.approx([toy.SPEED * (toy.FRAMES - 1) / toy.SIZE] * 3, abs=0.02)
    still = red[:1].expand(toy.FRAMES, -1, -1, -1)[None]  # (1, F, 3, H, W): the first frame repeated
    assert load_reward("motion")(still, [""]).item() == pytest.approx(0.0, abs=1e-4)
    blank = torch.full_like(red, toy.BACKGROUND[0])[None]  # (1, F, 3, H, W): nothing drawn
    assert redness(blank, [""]).item() < -0.85 < r["redness"][1]  # vanishing never pays
    blue = clip_video("a small blue triangle moving up")[None]  # the toy's least red shape
    assert redness(blank, [""]).item() < redness(blue, [""]).item()
    for name, value in r.items():
        assert value.shape == (3,)
        (grad,) = torch.autograd.grad(value.sum(), frames)
        assert grad.abs().sum() > 0, name


def test_judge_reads_rendered_clips_and_its_reward_pulls_the_pixels():
    videos, captions = next(toy.batches(64, seed=5, split="all"))  # (64, F, 3, H, W), held-out pairs too
    want = [toy.Clip.parse(c) for c in captions]
    for weights in (JUDGE_FILE, NAIVE_JUDGE_FILE, UNHARDENED_JUDGE_FILE):  # the committed judges read clean clips alike
        read = classify(load_judge(weights), videos)
        accuracy = {a: sum(getattr(r, a) == getattr(w, a) for r, w in zip(read, want)) / len(want) for a in ATTRIBUTES}
        assert all(accuracy[a] >= floor for a, floor in JUDGE_FLOORS.items()), (weights.name, accuracy)
    judge = load_reward("toy_judge")
    caption = "a big blue triangle moving up"  # a held-out pair
    right, wrong = clip_video(caption), clip_video("a big blue circle moving up")
    frames = torch.stack([right, wrong]).requires_grad_(True)  # (2, F, 3, H, W)
    r = judge(frames, [caption, caption])
    assert r.shape == (2,) and r[1] < r[0] - 1 and r[0] > -0.1, r  # the circle is not what was asked for
    (grad,) = torch.autograd.grad(r[1], frames)
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # the gradient reaches the pixels it scored
    seen = "a big red circle moving up"  # as an evaluation reward: held-out and seen pairs apart
    parts = judge.parts(torch.stack([right, clip_video(seen)]), [caption, seen])
    assert parts["heldout"] == pytest.approx(r[0].item(), abs=1e-6) and -0.1 < parts["seen"] <= 0, parts
    one = judge(frames[:, :1], [caption, caption])  # one decoded frame: colour, shape and size only
    assert one.shape == (2,) and one[1] < one[0] - 1
    blank = torch.full_like(right, toy.BACKGROUND[0])[None]  # (1, F, 3, H, W): nothing drawn
    assert judge(blank, [caption]).item() < r[0].item() - 0.5  # erasing a shape never pays


def test_only_the_unhardened_judge_pays_for_erasing_a_shape_it_cannot_fix():
    """The exploit the README's reward-hacking run finds. On one decoded frame (as training scores
    it) of "a small blue triangle", the base model's usual mistake is a blue circle; the judge
    trained without morphs and uniform targets scores an empty frame above it, so an optimiser
    erases the shape. The committed judge scores the empty frame below the circle."""
    caption = "a small blue triangle moving up"
    wrong = clip_video("a small blue circle moving up")
    frames = torch.stack([wrong, torch.full_like(wrong, toy.BACKGROUND[0])])[:, :1]  # (2, 1, 3, H, W): circle, empty
    circle, empty = load_reward("toy_judge", weights=str(UNHARDENED_JUDGE_FILE))(frames, [caption] * 2)
    assert empty > circle + 0.5, (circle, empty)
    circle, empty = load_reward("toy_judge")(frames, [caption] * 2)
    assert empty < circle - 0.5, (circle, empty)


def test_detector_splits_held_out_and_seen_pairs():
    captions = ["a big blue triangle moving up", "a small red circle moving left", "a big red square moving down"]
    videos = torch.stack([clip_video(c) for c in captions])  # (3, F, 3, H, W)
    detector = load_eval_rewards("detector")["detector"]
    assert detector(videos, captions).tolist() == [1.0, 1.0, 1.0]
    videos[0] = clip_video("a big blue square moving up")  # the held-out caption's video has the wrong shape
    parts = detector.parts(videos, captions)
    assert parts["heldout_shape"] == 0.0 and parts["heldout_colour"] == 1.0 and parts["seen_shape"] == 1.0
    assert detector.parts(videos[1:], captions[1:])["heldout_shape"] == ""  # no held-out video


@pytest.mark.parametrize("kind", [[], ["--naive"], ["--unhardened"]])
def test_judge_training_script_writes_a_loadable_judge(tmp_path, kind):
    """Two steps on a few clips and samples: the script runs end to end and its file loads."""
    out = tmp_path / "judge.safetensors"
    train_judge.main(["--out", str(out), "--steps", "2", "--batch", "2", "--pool", "2", "--samples", "2",
                      "--report-clips", "4", "--report-samples", "2", *kind])
    assert out.stat().st_size < 2**20
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}
    assert len(classify(load_judge(out), clip_video("a big red circle moving left")[None])) == 1


@pytest.fixture(scope="module")
def toy_model():
    return load_video_model("toy")


def test_committed_weights_are_small_half_precision_safetensors(toy_model):
    files = [f for f in models.TOY_FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 16 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert sorted(f.parent.name for f in weights) == ["text_encoder", "unet", "vae"]
    for f in weights:
        assert f.suffix == ".safetensors" and {t.dtype for t in load_file(f).values()} == {torch.float16}, f
    assert toy_model.spec == models.MODELS["toy"] and toy_model.vae_factor == 4
    assert toy_model.schedule.prediction_type == "v_prediction"  # see toy/pretrain.py: TOY_SCHEDULER


def test_base_model_draws_what_its_captions_ask_for(toy_model):
    """Every fifth training caption (16: all colours, shapes, sizes and directions), one video each."""
    captions = [c.caption for c in toy.all_clips("train")][::5]
    videos = sample_model(toy_model, captions, seed=0)
    assert videos.shape == (len(captions), toy.FRAMES, 3, toy.SIZE, toy.SIZE)
    accuracy = toy.accuracy(videos, captions)
    assert all(accuracy[k] >= floor for k, floor in FLOORS.items()), accuracy


def test_missing_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TOY_FOLDER", tmp_path / "toy_model")
    with pytest.raises(UserError, match="toy.pretrain"):
        load_video_model("toy")


@pytest.mark.parametrize("flag", ["--repeats", "--num-steps"])
def test_evaluate_refuses_no_videos_or_no_steps(flag):
    with pytest.raises(UserError, match=f"^{flag} must be 1 or more, got 0$"):
        toy_evaluate.main([flag, "0"])


def test_pretraining_script_writes_a_loadable_model(tmp_path):
    """Two steps of each stage: the script runs end to end and its folder loads like the committed one."""
    out = tmp_path / "toy_model"
    pretrain_toy.main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--batch", "2",
                       "--prompts-dir", str(tmp_path)])
    assert not out.with_name("toy_model.partial").exists()
    model = load_video_model(str(out))
    assert model.unet.config.sample_size == 8 and model.tokenizer.model_max_length == pretrain_toy.TOKENS
    for name in ("toy.txt", "toy_heldout.txt", "toy_eval.txt"):  # the committed prompt files are the script's
        assert (tmp_path / name).read_text() == (PROMPTS_DIR / name).read_text(), name


@pytest.mark.slow  # the README's CPU demo, shortened: about 15 s
def test_short_alignment_to_the_judge_draws_held_out_shapes_better(tmp_path, capsys):
    """train.py on the toy model as the README's demo runs it, shorter: the toy recipe supplies the
    reward, the training prompts and the learning rate, and the flags typed here win over the rest
    (6 of its 60 steps, 8 held-out videos). The weight-free detector, not the judge, reads the
    first 8 held-out videos (fixed seeds): more of their shapes are right than the base model's at
    the same seeds (on this project's CPU: 1 of 8 before; 2 after 4 steps, 4 after 6, 8, 10 and 12)."""
    demo = train.parse_config(["--model", "toy"])[0]
    assert (demo.reward, demo.prompts, demo.eval_prompts, demo.output_dir) == (
        "toy_judge", "toy_heldout.txt", "toy_eval.txt", "runs/toy-toy_judge")
    assert (demo.max_steps, demo.lr, demo.grad_steps) == (60, 3e-3, 2)
    out = tmp_path / "judge"
    run_cli(train.main, ["--model", "toy", "--max-steps", "6", "--eval-prompts", "toy_heldout.txt", "--eval-every", "6",
                         "--eval-videos", "8", "--eval-rewards", "detector", "--num-videos", "1",
                         "--output-dir", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["reward"], cfg["prompts"], cfg["lr"]) == ("toy_judge", "toy_heldout.txt", 3e-3)  # the recipe's
    assert (cfg["max_steps"], cfg["eval_prompts"], cfg["eval_videos"]) == (6, "toy_heldout.txt", 8)  # typed
    shape = {int(r["step"]): float(r["eval_detector/heldout_shape"]) for r in read_metrics(out) if r["eval_reward"]}
    assert sorted(shape) == [0, 6] and shape[6] > shape[0], shape
    assert (out / "videos" / "after.gif").stat().st_size > 0
    # A student measures a run with `python -m toy.evaluate --lora` (held-out pairs only here).
    # 6 steps move too few of its 16 videos to tell, so the check that the LoRA is applied uses
    # the same file with B scaled up 30 times: a LoRA that large breaks what the model draws, where
    # the base and this run keep colour, size and direction (3 of the 4 accuracies) at 1.
    with safe_open(out / "lora.safetensors", "pt") as f:
        loud = {k: f.get_tensor(k) * (30 if ".lora_B." in k else 1) for k in f.keys()}
        save_file(loud, tmp_path / "loud.safetensors", metadata=f.metadata())
    toy_evaluate.main(["--lora", str(tmp_path / "loud.safetensors"), "--split", "heldout", "--repeats", "1",
                       "--num-steps", "4"])
    line = capsys.readouterr().out.splitlines()[-1]  # "heldout  colour 1.00  shape 0.44 ...   (16 videos)"
    assert line.startswith("heldout") and line.endswith("(16 videos)"), line
    assert sum(map(float, line.split()[2:9:2])) < 2.5, line
