"""Neural networks on top of ``hrseg.parallel``: the same code runs on one device or per shard.

    norm        batch/group/instance norms and in-place activated BN (custom VJPs)
    layers      ConvBlock, CompactConvBlock (Wang et al.), up/down sampling
    unet        UNet3D / UNet2D and the papers' presets
    precision   mixed-precision policies (param / compute dtypes)
    losses      generalized Dice + cross-entropy, psum'd across shards
"""
