"""The hybrid path's own kernels: the CPU's one-token experts as compiled numba code (cpu_numba.py) on a pool of
spinning threads (spin_pool.py), the thread that serves doorbell-rung steps (doorbell.py), and the GPU's
bookkeeping of a step as one Triton kernel (triton_hybrid.py, used only where Triton runs)."""
