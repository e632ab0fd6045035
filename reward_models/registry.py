"""The rewards defined below rewards.py, by name, and the training defaults a reward brings.

Each is named by module path ("toy.rewards:redness") and imported only when it is built, so asking
for one reward never imports every package that holds another.
"""
from reward_models.options import parse_reward_spec

# name -> ("module:function", description), for --help, errors and rewards.load_reward.
ELSEWHERE = {
    "dynamics": ("reward_models.pixels:dynamics", "mean change between consecutive frames, 0..1: how much moves (needs 2+ frames)"),
    "smoothness": ("reward_models.pixels:smoothness", "negative mean change between consecutive decoded frames (needs 2+ frames)"),
    "compressibility": ("reward_models.pixels:compressibility", "negative total variation, a differentiable stand-in for JPEG size"),
    "colorfulness": ("reward_models.pixels:colorfulness", "Hasler-Suesstrunk colourfulness, ~0..1 (weight-free; for the tiny model)"),
    "darkness": ("reward_models.pixels:darkness", "1 - mean luma, 0..1 (weight-free; the opposite of brightness)"),
    "brightness": ("reward_models.pixels:brightness", "mean luma of the frames, 0..1 (weight-free; for the tiny model)"),
    "hps": ("reward_models.image:hps",
            "HPSv2.1 human preference: cosine of OpenCLIP ViT-H-14 frame and prompt, ~0.2..0.35 (xswu/HPSv2)"),
    "pickscore": ("reward_models.image:pickscore",
                  "PickScore v1: logit scale x cosine of CLIP-H frame and prompt, ~20 (yuvalkirstain/PickScore_v1)"),
    "clip": ("reward_models.image:clip",
             "CLIP ViT-L/14 cosine of frame and prompt embeddings, ~0.2..0.35 (openai/clip-vit-large-patch14)"),
    "aesthetic_hps": ("reward_models.image:aesthetic_hps",
                      "VADER's mix aesthetic:0.075,hps:0.5 (their aesthetic_hps loss, negated)"),
    "actpred": ("reward_models.video:actpred",
                "VideoMAE Kinetics-400 probability of the prompt's action, 0..1 (MCG-NJU/videomae-base-finetuned-kinetics)"),
    "object": ("reward_models.video:object_presence",
               "OWLv2 presence of the object query=, 0..1; remove=True: 1 - presence (google/owlv2-base-patch16-ensemble)"),
    "video_text": ("reward_models.video:video_text",
                   "X-CLIP video-prompt similarity, logit scale x cosine (microsoft/xclip-base-patch32)"),
    "temporal": ("reward_models.video:temporal",
                 "V-JEPA 2 predictability of the clip's second half from its first, ~-1..0 (facebook/vjepa2-vitl-fpc64-256)"),
    "videoreward": ("reward_models.videoreward:videoreward",
                    "VideoAlign's VideoReward on Qwen2-VL-2B: visual quality + motion quality + text alignment, each "
                    "normalised, ~-3..3 each (KwaiVGI/VideoReward; needs 2+ frames across the clip)"),
    "tiny_videoreward": ("reward_models.tiny_videoreward:tiny_videoreward",
                         "VideoReward's code on a tiny random Qwen2-VL (for the CPU and the tiny models)"),
    "redness": ("toy.rewards:redness", "toy world: how red the shape's colour is, as a direction from the background, -1..1"),
    "size": ("toy.rewards:size", "toy world: the shape's area as a fraction of the frame, 0..1"),
    "contrast": ("toy.rewards:contrast", "toy world: the shape's mean RGB distance from the background, 0..1"),
    "motion": ("toy.rewards:motion",
               "toy world: centroid travel from first to last decoded frame / frame width, 0..1.4 (2+ frames)"),
    "toy_judge": ("toy.judge:toy_judge",
                  "toy world: mean log-probability the learned toy judge gives the caption's attributes, -inf..0"),
    "detector": ("toy.rewards:detector",
                 "toy world, evaluation only: the weight-free detector's accuracy on the caption's attributes, 0..1"),
}


# Training defaults a reward brings (a typed flag wins). VideoReward drifts towards an over-exposed,
# animated look when over-optimised, which it cannot see itself: second opinions watch for it, an
# image aesthetic judge and the motion measure, on held-out videos (docs/rewards.md).
RECIPES = {"videoreward": {"eval_every": 25, "eval_rewards": "aesthetic,dynamics"}}


def reward_recipe(spec):
    """The training defaults of the rewards in `spec` ("videoreward" or a weighted sum)."""
    out = {}
    for name, _ in parse_reward_spec(spec):
        out.update(RECIPES.get(name, {}))
    return out
