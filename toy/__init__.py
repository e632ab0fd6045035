"""The toy world: a CPU-sized world of one coloured shape moving over a plain background.

world.py renders captioned clips and reads them back with a weight-free detector; rewards.py
scores the shape (redness, size, contrast, motion); pretrain.py trains the small text-to-video
model whose weights are committed in model/ (`--model toy`); evaluate.py measures how often
that model draws what its captions ask for.
"""
