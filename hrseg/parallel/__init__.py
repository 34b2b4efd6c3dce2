"""Parallel: the only code that knows about meshes (imports nothing else of hrseg).

    partition   axis names, meshes, shardings, divisibility, the backends and the Layout
    exchange    halo exchange between neighbouring shards (lax.ppermute) and its transpose
    halo        per-shard ops for shard_map: conv, max-pool, up-conv, moments, psum helpers
    submesh     coarse levels on fewer devices: all-gather a thin level along mesh axes
    uneven      sizes that do not split evenly: padded in the step, masked in conv and moments
    cpuconv     the 3D conv on XLA:CPU (model.conv: auto picks it there): the direct conv where
                it is built, else wide-image 2D convs
    native      the direct 3D conv in C++ (conv3d.cc): built on first use, called via jax.ffi
"""
