"""hrseg: full-resolution 3D segmentation with spatial partitioning (see the README)."""
from hrseg import hostmem

hostmem.configure()   # before JAX starts its CPU threads: see hostmem.py
