"""fedsparse: federated on-device recommendation with sparse embedding training.

The core package never imports flwr; Flower shells live in ``clients/`` and ``server/``.
"""

__version__ = "0.1.0"
