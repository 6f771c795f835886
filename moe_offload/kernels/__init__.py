"""Expert compute kernels: reference.py is the eager torch path (CPU path and test oracle)."""
