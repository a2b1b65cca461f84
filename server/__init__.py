"""Flower ServerApp: runs ``fedsparse.federation.engine.run_federation`` with Flower messages as its transport."""
