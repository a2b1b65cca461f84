"""Flower ServerApp: runs ``fedsparse.engine.run_federation`` with Flower messages as its transport."""
