"""What one reading of the GPU's memory in use costs, by NVML and by nvidia-smi, and whether they agree.

Why: the side-by-side run (bench/harness.py, bench/sides.py) polls the GPU's memory every 50 ms while either side
runs, and both sides keep every core of the H200 machine busy. A reading that is a process of its own (nvidia-smi)
takes CPU time from them; one through NVML in the poller's process should not. This measures both.

Usage, from the repository root: python -m bench.llamacpp.memory_reader_cost [--readings 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from bench.llamacpp import run_llama_bench as reader


def timed_readings(read, readings: int) -> dict:
    """Median wall seconds per reading, CPU seconds per reading (this process and its children), the values."""
    walls, values = [], []
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    for _ in range(readings):
        start = time.perf_counter()
        values.append(read())
        walls.append(time.perf_counter() - start)
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, usage))
    return {"wall_s_median": statistics.median(walls), "cpu_s_per_reading": cpu / readings, "values": values}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from bench.common import machine, utc_now

    report = {"date": utc_now(), "machine": machine(), "source": reader.memory_source()}
    lib = reader._nvml()
    if lib is not None:
        report["nvml"] = timed_readings(lambda: reader._nvml_used_bytes(lib, None), args.readings)
    saved, reader._nvml_lib = reader._nvml_lib, False  # nvidia-smi's path, as where NVML does not load
    try:
        if reader.memory_source() == "nvidia-smi":
            report["nvidia_smi"] = timed_readings(reader.gpu_memory_used_bytes, args.readings)
    finally:
        reader._nvml_lib = saved
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
