"""Persistent spinning CPU worker threads for numba kernels, driven from any thread without the GIL.

Why: a hybrid decode step computes a layer's CPU experts on the doorbell thread (doorbell.py) or inside a CUDA
host function on the driver's callback thread, about once a millisecond. numba's own parallel regions
(parallel=True) take the GIL twice each (the gufunc wrapper's gil_ensure and restore_thread,
numba/np/ufunc/parallel.py) and run on libgomp teams whose idle threads sleep on a futex once the process's teams
outnumber the CPUs. With the launching thread busy in Python each of those GIL acquisitions can wait out a switch
interval (5 ms by default), so a one-expert step took tens of times longer than with that thread blocked. Here
the workers are threads running compiled code that never takes the GIL; between jobs they spin on a generation
counter with the CPU's pause instruction, as llama.cpp's CPU thread pool does, and sleep only after SPIN_CYCLES
(~20 ms) without work.

A job has two phases of work items (phase 1 must finish before phase 2 starts: an expert's gate/up rows before
its down rows). The driving thread works too. Items are handed out by an atomic ticket counter, so a worker that
wakes late finds the work done and delays nothing; the driver returns when every item is done.

Protocol, over a control block of int64 words (the hot ones a cache line apart): GEN even = job GEN/2 is open,
odd = the driver is setting up the next one, negative = shut down. A driver takes OWNER (one at a time), makes
GEN odd, waits until no worker is inside a job (ACTIVE = 0), writes JOB/ITEMS1/ITEMS2 and zeroes TICKET/DONE,
then makes GEN even again. A worker that sees a new even GEN counts itself into ACTIVE, reads GEN again and
works only if it is unchanged: so no worker ever takes a ticket from a counter being reset (sequentially
consistent atomics throughout).
"""

from __future__ import annotations

import atexit
import platform
import threading
import weakref

import numpy as np

GEN, ACTIVE, TICKET, DONE, OWNER = 0, 8, 16, 24, 32  # int64 indices, 64 bytes apart
JOB, ITEMS1, ITEMS2 = 40, 41, 42  # written by the driver before it opens a job
CONTROL_WORDS = 48
SPIN_CYCLES = 50_000_000  # cycle-counter ticks a worker spins without work before it sleeps (~20 ms at 2.5 GHz)
LONG_IDLE_CYCLES = 5_000_000_000  # then it sleeps SLEEP_US at a time, and LONG_SLEEP_US after ~2 s idle
SLEEP_US, LONG_SLEEP_US = 100, 2000

_compiled: dict = {}


def intrinsics() -> dict:
    """numba intrinsics by name: atomic_load/store/add/cas on int64 arrays, load_word/store_word on int32s at raw
    addresses, cpu_pause (the pause instruction) and cycles (the cycle counter)."""
    if "intrinsics" in _compiled:
        return _compiled["intrinsics"]
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def element_pointer(context, builder, signature, args):
        array_type, index_type = signature.args[:2]
        array = context.make_array(array_type)(context, builder, args[0])
        index = context.cast(builder, args[1], index_type, types.intp)
        return builder.gep(array.data, [index])

    @intrinsic
    def atomic_load(typingctx, array, index):
        def codegen(context, builder, signature, args):
            return builder.load_atomic(element_pointer(context, builder, signature, args), "seq_cst", 8)
        return types.int64(array, index), codegen

    @intrinsic
    def atomic_store(typingctx, array, index, value):
        def codegen(context, builder, signature, args):
            value = context.cast(builder, args[2], signature.args[2], types.int64)
            builder.store_atomic(value, element_pointer(context, builder, signature, args), "seq_cst", 8)
            return context.get_dummy_value()
        return types.void(array, index, value), codegen

    @intrinsic
    def atomic_add(typingctx, array, index, value):  # returns the old value
        def codegen(context, builder, signature, args):
            value = context.cast(builder, args[2], signature.args[2], types.int64)
            return builder.atomic_rmw("add", element_pointer(context, builder, signature, args), value, "seq_cst")
        return types.int64(array, index, value), codegen

    @intrinsic
    def atomic_cas(typingctx, array, index, expected, value):  # returns the old value
        def codegen(context, builder, signature, args):
            expected = context.cast(builder, args[2], signature.args[2], types.int64)
            value = context.cast(builder, args[3], signature.args[3], types.int64)
            pair = builder.cmpxchg(element_pointer(context, builder, signature, args), expected, value,
                                   "seq_cst", "seq_cst")
            return builder.extract_value(pair, 0)
        return types.int64(array, index, expected, value), codegen

    def word_pointer(builder, address):  # int64 address -> i32*
        return builder.inttoptr(address, ir.PointerType(ir.IntType(32)))

    @intrinsic
    def load_word(typingctx, address):  # an int32 at an address (memory another agent writes: the GPU, say)
        def codegen(context, builder, signature, args):
            return builder.sext(builder.load_atomic(word_pointer(builder, args[0]), "seq_cst", 4), ir.IntType(64))
        return types.int64(types.int64), codegen

    @intrinsic
    def store_word(typingctx, address, value):  # an int32 to an address, seen after every earlier store
        def codegen(context, builder, signature, args):
            value = context.cast(builder, args[1], signature.args[1], types.int32)
            builder.store_atomic(value, word_pointer(builder, args[0]), "seq_cst", 4)
            return context.get_dummy_value()
        return types.void(types.int64, value), codegen

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")  # (numba's JIT takes no inline asm)

    @intrinsic
    def cpu_pause(typingctx):  # a spin-wait hint (x86's pause): frees the core's resources, saves power
        def codegen(context, builder, signature, args):
            if x86:
                pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                       "llvm.x86.sse2.pause")
                builder.call(pause, [])
            return context.get_dummy_value()
        return types.void(), codegen

    @intrinsic
    def cycles(typingctx):  # the CPU's cycle counter (rdtsc on x86)
        def codegen(context, builder, signature, args):
            counter = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                                     "llvm.readcyclecounter")
            return builder.call(counter, [])
        return types.int64(), codegen

    _compiled["intrinsics"] = dict(atomic_load=atomic_load, atomic_store=atomic_store, atomic_add=atomic_add,
                                   atomic_cas=atomic_cas, cpu_pause=cpu_pause, cycles=cycles, load_word=load_word,
                                   store_word=store_word)
    return _compiled["intrinsics"]


def idle_function():
    """idle(since): one round of a thread's wait for work, idle since cycle count `since`: the pause instruction
    for SPIN_CYCLES, then sleeps of SLEEP_US, then of LONG_SLEEP_US after LONG_IDLE_CYCLES (compiled, nogil)."""
    if "idle" in _compiled:
        return _compiled["idle"]
    import ctypes

    from numba import njit

    ops = intrinsics()
    cpu_pause, cycles = ops["cpu_pause"], ops["cycles"]
    usleep = ctypes.CDLL(None).usleep
    usleep.argtypes, usleep.restype = [ctypes.c_uint], ctypes.c_int

    @njit(nogil=True)
    def idle(since):
        waited = cycles() - since
        if waited < SPIN_CYCLES:
            cpu_pause()
        else:
            usleep(SLEEP_US if waited < LONG_IDLE_CYCLES else LONG_SLEEP_US)

    _compiled["idle"] = idle
    return idle


def pool_functions(run_item):
    """(worker_loop(control), drive(control, job, items1, items2)) for run_item(job, phase, index), compiled.

    run_item: a numba @njit(nogil=True) function computing work item `index` (0-based) of phase 1 or 2 of the job
    whose int64 descriptor lies at address `job`. drive runs on the calling thread without the GIL (from Python
    too: it is nogil) and returns when every item of both phases is done."""
    key = ("pool", run_item)
    if key in _compiled:
        return _compiled[key]
    from numba import njit

    ops = intrinsics()
    atomic_load, atomic_store, atomic_add, atomic_cas = (ops[name] for name in ("atomic_load", "atomic_store",
                                                                               "atomic_add", "atomic_cas"))
    cpu_pause, cycles = ops["cpu_pause"], ops["cycles"]
    idle = idle_function()

    @njit(nogil=True)
    def take_tickets(control):
        job, items1, items2 = control[JOB], control[ITEMS1], control[ITEMS2]
        total = items1 + items2
        while True:
            ticket = atomic_add(control, TICKET, 1)
            if ticket >= total:
                return
            if ticket < items1:
                run_item(job, 1, ticket)
            else:
                while atomic_load(control, DONE) < items1:  # phase 2 reads what phase 1 wrote
                    cpu_pause()
                run_item(job, 2, ticket - items1)
            atomic_add(control, DONE, 1)

    @njit(nogil=True)
    def worker_loop(control):
        seen = atomic_load(control, GEN)
        idle_since = cycles()
        while True:
            generation = atomic_load(control, GEN)
            if generation < 0:
                return
            if generation == seen or generation % 2 == 1:
                idle(idle_since)
                continue
            atomic_add(control, ACTIVE, 1)
            if atomic_load(control, GEN) == generation:  # not closed since: its counters are this job's
                take_tickets(control)
                seen = generation
                idle_since = cycles()
            atomic_add(control, ACTIVE, -1)

    @njit(nogil=True)
    def drive(control, job, items1, items2):
        while atomic_cas(control, OWNER, 0, 1) != 0:  # one driver at a time
            cpu_pause()
        generation = atomic_load(control, GEN)
        atomic_store(control, GEN, generation + 1)  # closed: no worker enters
        while atomic_load(control, ACTIVE) != 0:  # late workers of the last job leave its counters
            cpu_pause()
        control[JOB] = job
        control[ITEMS1] = items1
        control[ITEMS2] = items2
        atomic_store(control, TICKET, 0)
        atomic_store(control, DONE, 0)
        atomic_store(control, GEN, generation + 2)  # open (the seq_cst store publishes the fields above)
        take_tickets(control)
        total = items1 + items2
        while atomic_load(control, DONE) < total:
            cpu_pause()
        atomic_store(control, OWNER, 0)

    stopped = np.zeros(CONTROL_WORDS, dtype=np.int64)
    stopped[GEN] = -1
    worker_loop(stopped)  # compiles it here: returns at once
    _compiled[key] = (worker_loop, drive)
    return _compiled[key]


class SpinPool:
    """`workers` threads spinning for jobs of run_item (see the module docstring); the driver makes one more.

    address: the control block's address, for compiled drivers (a CUDA host function's cfunc) that call drive
    on carray(address). Closed at exit; close() stops and joins the threads.
    """

    def __init__(self, workers: int, run_item):
        self.workers = int(workers)
        self.control = np.zeros(CONTROL_WORDS, dtype=np.int64)
        self.address = self.control.ctypes.data
        worker_loop, self._drive = pool_functions(run_item)
        self._threads = [threading.Thread(target=worker_loop, args=(self.control,), daemon=True,
                                          name=f"moe-spin-{i}") for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.control, self._threads)
        atexit.register(self._finalizer)

    def run(self, job: np.ndarray, items1: int, items2: int) -> None:
        """Run a job (job: its int64 descriptor, kept alive by the caller) on this thread and the workers."""
        self._drive(self.control, job.ctypes.data, int(items1), int(items2))

    def close(self) -> None:
        self._finalizer()


def _stop(control: np.ndarray, threads: list[threading.Thread]) -> None:
    control[GEN] = -1  # workers load it atomically; an aligned int64 store is seen whole
    for thread in threads:
        thread.join()
