"""The model-backed rewards: frozen, differentiable judges loaded from the hub or a local copy.

image.py scores frames one by one (aesthetic, hps, pickscore, clip, aesthetic_hps), video.py
scores clips (actpred, object, video_text, temporal), and common.py holds what they share:
loading, freezing, and the official preprocessing rebuilt from tensor ops so gradients reach the
pixels. registry.py names them for rewards.py, which imports a module only when one of its rewards
is asked for.
"""
