"""Which frames a reward reads, for the harness: the default f, and the frames of a whole video it scores."""
from vader import reads_whole_clip, spread_frames


def default_decode_frames(reward_fn, num_frames, fps):
    """The default f: 1 for a reward that scores frames, or for one that watches the clip at its own
    rate the frames that rate gives of an F-frame clip made at `fps`, in pairs, at least 4 and at
    most F (the rule of Qwen2-VL's video reader: 33 frames at 16 fps, read at 2 fps -> 4; 81 -> 10)."""
    if not reads_whole_clip(reward_fn):
        return 1
    n = max(num_frames / fps * reward_fn.fps, 4)
    return max(reward_fn.min_frames, min(num_frames, round(n / 2) * 2))


def frames_scored(reward_fn, video, f, fps):
    """What a reward scores of whole videos (B, F, 3, H, W) made at `fps`: every frame, or for one that
    watches the clip at its own rate f frames spread over it (None: `default_decode_frames`)."""
    if not reads_whole_clip(reward_fn):
        return video
    f = f or default_decode_frames(reward_fn, video.shape[1], fps)
    return video[:, spread_frames(video.shape[1], f).to(video.device)]  # (B, f, 3, H, W)
