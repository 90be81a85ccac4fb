"""`make bench`: raylign against TRL and its own parts, on this machine (see benchmarks/run.py)."""
