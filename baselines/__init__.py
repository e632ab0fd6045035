"""Gradient-free rivals of VADER (DDPO), and the benchmark that measures them against it per
reward query: `python bench.py efficiency`."""
