"""What configures the process, in one place.

    hostmem        glibc malloc settings for XLA:CPU's per-step scratch
    compile_cache  JAX's persistent compilation cache folder
"""
