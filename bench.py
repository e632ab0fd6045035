"""Measurements: what VADER costs, and what it buys.

    python bench.py speed ...        memory and time of a training step vs plain generation (benchmarks/speed.py)
    python bench.py memory ...       the same memory predicted on a CPU, with FLOPs (benchmarks/memory.py)
    python bench.py compare ...      measured against predicted, after benchmarks/gpu_check.sh on a GPU
    python bench.py efficiency ...   VADER against the gradient-free baselines (DDPO, GRPO), per reward query
                                     (baselines/efficiency.py)

Both run train.train_step, the step train.py runs. Results are printed and written as tables
under --output-dir; BENCHMARKS.md collects them with the command, date and device.
"""
import argparse

from baselines import efficiency
from benchmarks import memory, speed
from infra.cli import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    speed.add_parser(sub)
    memory.add_parser(sub)
    memory.add_compare_parser(sub)
    efficiency.add_parser(sub)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
