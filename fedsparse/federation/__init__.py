"""The federation: the server's run loop and state, the device's private state and local round, the
messages between them and their encoding, aggregation (plain, robust, secure), NeuMF's shared network
(FedNCF), the secure NMF start, faults, streaming, poisoning and the in-process transport.

May import every lower package (``data``, ``eval``, ``sparse``, ``central``, ``privacy``) and the base
modules; never ``experiments``, and never ``flwr`` (the Flower shells in ``clients/`` and ``server/``
translate messages to these calls).
"""
