"""Reproduction of Singh et al. 2024: the experiment registry, its scales and the report.

  ih-jax reproduce --figure=5b --scale=quick --workdir=/tmp/repro
"""
