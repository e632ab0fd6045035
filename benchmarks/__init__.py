"""Measurements of what a VADER step costs at real model sizes: `python bench.py speed`."""
