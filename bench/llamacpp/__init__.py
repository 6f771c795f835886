"""The llama.cpp side of the side-by-side benchmark (bench/vs_llamacpp.py); README.md here says how to run it."""
