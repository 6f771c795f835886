"""A CPU thread that serves hybrid decode steps rung through page-locked memory words, instead of CUDA host
functions (share.CpuShare; the GPU side's stream memory operations are in driver.py).

Why: a host node costs the layer a round trip through the CUDA driver's callback thread even when the step gives
the CPU nothing to do; where steps have few misses (high offload ratios) that fixed cost outweighed what the CPU
saved, even with the compiled step and the spin pool, and the decode check turned the path off. Here the GPU side
is copies and stream memory operations (cuStreamWaitValue32 / cuStreamWriteValue32, which stream capture records
as graph nodes), and the CPU side is one thread that spins over every share's doorbell word, as the spin pool's
workers spin, and drives the pool itself. This handoff costs a layer less than a host node when the CPU has
nothing to do, and decoded faster at most ratios on an H200: hence the one handoff, the host node left only
where the driver refuses.

Per share, two int32 words a cache line apart in page-locked memory (DOORBELL_WORDS): RING, which the GPU
overwrites after each step's mailbox copy with a device counter it increments every step (a later copy in
the same stream, so the mailbox is in place when RING changes), and DONE, which the server sets to 1 once the
step's outputs are in; the GPU waits for DONE == 1, sets it back to 0, then copies the outputs in. The server
keeps the last RING value it served per share: a new value is a new step.
"""

from __future__ import annotations

import atexit
import threading
import weakref

import numpy as np

RING, DONE = 0, 16  # int32 indices of a share's doorbell words (64 bytes apart)
DOORBELL_WORDS = 32
CAPACITY = 1024  # shares one server can watch
_ROW = 4  # table row: RING address (0: unregistered), DONE address, step descriptor address, last RING served
_COUNT, _STOP, _SERVING = 0, 8, 16  # control words: rows in use, stop, the row being looked at (-1: none)

_compiled: dict = {}


def _functions():
    """(serve(table, control): the server's loop, unregister(table, control, row)), compiled (nogil)."""
    if "serve" in _compiled:
        return _compiled["serve"], _compiled["unregister"]
    from numba import carray, njit

    from .cpu_numba import DESCRIPTOR_FIELDS, as_pointer, step_kernel
    from .spin_pool import idle_function, intrinsics

    step, pointer, idle = step_kernel(), as_pointer(), idle_function()
    ops = intrinsics()
    atomic_load, atomic_store, cpu_pause = ops["atomic_load"], ops["atomic_store"], ops["cpu_pause"]
    cycles, load_word, store_word = ops["cycles"], ops["load_word"], ops["store_word"]
    fields = len(DESCRIPTOR_FIELDS)

    @njit(nogil=True)
    def serve(table, control):
        idle_since = cycles()
        while atomic_load(control, _STOP) == 0:
            served = False
            for share in range(atomic_load(control, _COUNT)):
                row = share * _ROW
                atomic_store(control, _SERVING, share)  # before reading the row: see unregister
                ring_address = atomic_load(table, row)
                if ring_address == 0:
                    continue
                ring = load_word(ring_address)
                if ring != table[row + 3]:
                    table[row + 3] = ring
                    step(carray(pointer(table[row + 2]), (fields,), np.int64))
                    store_word(table[row + 1], 1)  # after the outputs' stores: x86 keeps stores in order
                    served = True
            atomic_store(control, _SERVING, -1)
            if served:
                idle_since = cycles()
            else:
                idle(idle_since)

    @njit(nogil=True)
    def unregister(table, control, share):
        # Clear the row, then wait until the server is not looking at it. Both sequentially consistent: if the
        # server marked the row before the clear, this waits for it; if after, the server reads the cleared row.
        atomic_store(table, share * _ROW, 0)
        while atomic_load(control, _SERVING) == share:
            cpu_pause()

    stopped = np.zeros(24, dtype=np.int64)
    stopped[_STOP], stopped[_SERVING] = 1, -1
    serve(np.zeros(_ROW, dtype=np.int64), stopped)  # compile both here: return at once
    unregister(np.zeros(_ROW, dtype=np.int64), stopped, 0)
    _compiled.update(serve=serve, unregister=unregister)
    return serve, unregister


class DoorbellServer:
    """The serving thread and its table of shares (register); stopped at exit, once queued steps are served."""

    def __init__(self):
        self.table = np.zeros(CAPACITY * _ROW, dtype=np.int64)
        self.control = np.zeros(24, dtype=np.int64)
        self.control[_SERVING] = -1
        self._lock = threading.Lock()
        serve, self._unregister = _functions()
        self._thread = threading.Thread(target=serve, args=(self.table, self.control), daemon=True,
                                        name="moe-doorbell")
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.control, self._thread)
        atexit.register(self._finalizer)

    def register(self, doorbell: np.ndarray, descriptor: np.ndarray) -> int:
        """Serve the step `descriptor` (cpu_numba.DESCRIPTOR_FIELDS) whenever the RING word of `doorbell` (int32
        [DOORBELL_WORDS], page-locked on CUDA) changes; returns the registration, for unregister. The caller
        keeps both, and every buffer the descriptor names, alive until it unregisters."""
        with self._lock:
            count = int(self.control[_COUNT])
            if count == CAPACITY:
                raise RuntimeError(f"a doorbell server serves at most {CAPACITY} shares")
            row = count * _ROW
            address = doorbell.ctypes.data
            self.table[row:row + _ROW] = (address + 4 * RING, address + 4 * DONE, descriptor.ctypes.data,
                                          int(doorbell[RING]))
            self.control[_COUNT] = count + 1  # published after the row (stores stay in order on x86)
            return count

    def unregister(self, registration: int) -> None:
        """Stop serving a registration; when this returns the server no longer reads its buffers."""
        self._unregister(self.table, self.control, registration)


def _stop(control: np.ndarray, thread: threading.Thread) -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # first let every queued step that waits on a doorbell be served
    control[_STOP] = 1
    thread.join()


_server: DoorbellServer | None = None


def server() -> DoorbellServer:
    """The process's server, started on first use."""
    global _server
    if _server is None:
        _server = DoorbellServer()
    return _server
