"""Reproduction of Singh et al. 2024: the experiment registry, its scales and the report.

  python -m experiments.reproduce --figure=5b --scale=quick --workdir=/tmp/repro
"""
