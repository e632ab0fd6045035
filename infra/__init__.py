"""The plumbing every script shares and no lesson is about: one-line user errors, atomic file
writes, prompt files, run logs and checkpoints, multi-process helpers, video files."""
