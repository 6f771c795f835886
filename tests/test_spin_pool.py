"""hybrid/kernels/spin_pool.SpinPool: every item of both phases runs once, phase 2 only after phase 1, from any thread."""

import threading

import numpy as np
import pytest

pytest.importorskip("numba")

from moe_offload.hybrid.kernels.spin_pool import SpinPool  # noqa: E402

ITEMS = 64


def _run_item():
    from numba import carray, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.int64), codegen

    @njit(nogil=True)
    def run_item(job_address, phase, index):
        # job: [base, address of first [ITEMS] int64, address of second [ITEMS] int64]
        job = carray(as_pointer(job_address), (3,), np.int64)
        first = carray(as_pointer(job[1]), (ITEMS,), np.int64)
        second = carray(as_pointer(job[2]), (ITEMS,), np.int64)
        if phase == 1:
            first[index] += job[0] + index  # += : an item run twice shows
        else:  # reads another item's phase-1 result: wrong if phase 2 ran early
            second[index] += 2 * first[ITEMS - 1 - index]
    return run_item


RUN_ITEM = _run_item()


def _job(base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first, second = np.zeros(ITEMS, np.int64), np.zeros(ITEMS, np.int64)
    return np.array([base, first.ctypes.data, second.ctypes.data], np.int64), first, second


def _check(base: int, first: np.ndarray, second: np.ndarray) -> None:
    index = np.arange(ITEMS)
    assert np.array_equal(first, base + index)
    assert np.array_equal(second, 2 * (base + ITEMS - 1 - index))


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_every_item_once_and_phases_in_order(workers):
    pool = SpinPool(workers, RUN_ITEM)
    try:
        for base in range(300):  # back to back, while the workers spin
            job, first, second = _job(base)
            pool.run(job, ITEMS, ITEMS)
            _check(base, first, second)
    finally:
        pool.close()
    assert not any(thread.is_alive() for thread in pool._threads)


def test_two_drivers_share_a_pool():
    """Jobs driven from two threads at once (as two CUDA host functions could) run one after the other."""
    pool = SpinPool(2, RUN_ITEM)
    failures = []

    def drive(offset: int) -> None:
        try:
            for base in range(offset, offset + 200):
                job, first, second = _job(base)
                pool.run(job, ITEMS, ITEMS)
                _check(base, first, second)
        except AssertionError as err:
            failures.append(err)

    threads = [threading.Thread(target=drive, args=(offset,)) for offset in (0, 10_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()
    assert not failures
