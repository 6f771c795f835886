"""The llama.cpp side of the side-by-side benchmark (bench/harness.py through bench/sides.py); README.md here says how
to run it."""
