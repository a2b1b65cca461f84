"""Experiments around runs: result tables, reports over run directories, sweeps and launching
``flwr run``. The top of the package below ``cli``: may import everything in ``fedsparse`` but the CLI.
"""
