"""The lab around the engine: the `info`, `trace`, `simulate` and `bench` commands and their reports.

These modules measure and explain the engine (checkpoint sizes per ratio, routing traces, offline cache replay,
latency benchmarks, the machine and versions a number was taken on); none of them is needed to run a model.
They may import the engine; the engine (everything else in moe_offload except cli.py, the front door that wires
these commands) never imports them, which tests/test_layering.py enforces.
"""
