"""unet.py on one device: presets and their parameter counts by hand, shapes, precision, BN state."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hrseg.config import ModelConfig
from hrseg.nn import losses, unet
from hrseg.parallel import partition
from hrseg.train import step


def plain_unet_params(cin, base, levels, convs, classes, k=27, up=8, head_bias=False):
    """Parameters of a plain U-Net (bias-free convs, BN γ+β), written out level by level."""
    f = [base * 2 ** i for i in range(levels)]
    n, c = 0, cin
    for i in range(levels):                           # encoder blocks and the bottom
        n += k * c * f[i] + (convs - 1) * k * f[i] ** 2 + 2 * convs * f[i]
        c = f[i]
    for i in range(levels - 1):                       # k2s2 up, concat, block
        n += up * f[i + 1] * f[i] + k * 2 * f[i] * f[i] + (convs - 1) * k * f[i] ** 2
        n += 2 * convs * f[i]
    return n + f[0] * classes + (classes if head_bias else 0)


def test_mtf_parameter_count_by_hand():
    # down_1  27·1·32 + 27·32·32 + BN 2·(2·32)                      =    28,640
    # down_2  27·32·64 + 27·64·64 + 256                             =   166,144
    # down_3  27·64·128 + 27·128·128 + 512                          =   664,064
    # bottom  27·128·256 + 27·256·256 + 1024                        = 2,655,232
    # up_3    8·256·128 + 27·256·128 + 27·128·128 + 512             = 1,589,760
    # up_2    8·128·64 + 27·128·64 + 27·64·64 + 256                 =   397,568
    # up_1    8·64·32 + 27·64·32 + 27·32·32 + 128                   =    99,456
    # head    32·3 (no bias, as the released code)                  =        96
    #                                                                 5,600,960
    assert unet.param_count(unet.preset("mtf")) == 5_600_960
    assert plain_unet_params(1, 32, 4, 2, 3) == 5_600_960


def wang_params(block: str) -> int:
    """Parameters of the Wang reconstruction, written out from its description (schema.preset):
    widths 32-64-128-256, 2 convs per block, 3³ stride-2 conv down (doubling), nearest 2× +
    3³ conv up (halving), BN γ+β after every conv (no conv bias), head with bias; inside a
    bottleneck K = 2 and one 3³ conv (1-3-1); the network's very first conv stays full."""
    f = [32, 64, 128, 256]

    def conv(cin, cout, kind):                    # one conv + its BN
        return {"full": 27 * cin * cout, "sep": 27 * cin + cin * cout,
                "point": cin * cout}[kind] + 2 * cout

    def blk(cin, cout, first=False):
        if block in ("bottleneck", "compact"):
            m = cout // 2
            return (conv(cin, m, "point") + conv(m, m, "full" if block == "bottleneck" else "sep")
                    + conv(m, cout, "point"))
        kind = "sep" if block == "separable" else "full"
        return conv(cin, cout, "full" if first else kind) + conv(cout, cout, kind)

    n = blk(1, f[0], first=True)
    for i in range(1, 4):                         # stride-2 down conv, then the level's block
        n += conv(f[i - 1], f[i], "full") + blk(f[i], f[i])
    for i in range(3):                            # up conv, concat, block
        n += conv(f[i + 1], f[i], "full") + blk(2 * f[i], f[i])
    return n + f[0] * 3 + 3


# Wang, Oda & Mori (2020), Table 1: baseline, +bottleneck, +SepConv, +CCBlock (millions)
WANG_PARAMS = {"plain": 9.5, "bottleneck": 3.2, "separable": 2.7, "compact": 2.6}


@pytest.mark.parametrize("block", list(WANG_PARAMS))
def test_wang_parameter_counts_within_ten_percent_of_table_1(block):
    cfg = dataclasses.replace(unet.preset("wang_baseline"), block=block)
    model = unet.build(cfg)                       # the real network: its nnx.Param leaves
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == wang_params(block) == unet.param_count(cfg)
    assert abs(n / (WANG_PARAMS[block] * 1e6) - 1) <= 0.10, (block, n)
    if block == "compact":
        assert unet.param_count(unet.preset("wang_compact")) == n


def test_wang_parameter_counts_by_hand():
    # baseline: down_1 27·1·32 + 27·32·32 + BN 128                 =    28,640
    #   pool_1 27·32·64 + 128 = 55,424;   down_2 2·27·64² + 256    =   276,864
    #   pool_2 27·64·128 + 256 = 221,440; down_3 2·27·128² + 512   = 1,106,688
    #   pool_3 27·128·256 + 512 = 885,248; bottom 2·27·256² + 1,024 = 4,425,216
    #   up_3 27·256·128 + 256 + 27·256·128 + 27·128² + 512         = 2,212,608
    #   up_2 27·128·64 + 128 + 27·128·64 + 27·64² + 256            =   553,344
    #   up_1 27·64·32 + 64 + 27·64·32 + 27·32² + 128               =   138,432
    #   head 32·3 + 3                                               =        99
    #                                                                 8,741,891
    assert wang_params("plain") == 8_741_891
    # compact: the 6 stride-2 / up-sampling convs (2,323,776 with their BN) stay; each
    # block is 1³ cin -> C/2, [dw 27·C/2 + pw (C/2)²], 1³ C/2 -> C, BN after each
    assert wang_params("compact") == 2_482_131
    assert unet.param_count(unet.preset("wang_compact")) == 2_482_131


@pytest.mark.parametrize("res,levels,base", [(64, 3, 256), (128, 4, 128), (256, 5, 64),
                                             (512, 6, 32)])
def test_paper_schedule(res, levels, base):
    cfg = unet.preset("paper", res)
    assert (cfg.levels, cfg.base, cfg.convs_per_block, cfg.precision) == (levels, base, 4, "bf16")
    assert unet.filters(cfg)[-1] == 1024                  # every resolution ends at 1024
    assert unet.poolings_of(cfg) == levels - 1
    assert unet.param_count(cfg) == plain_unet_params(1, base, levels, 4, 3)


def test_paper2d_and_tiny():
    cfg = unet.preset("paper2d")
    assert cfg.dims == 2 and (cfg.levels, cfg.base) == (6, 32)
    assert unet.param_count(cfg, in_channels=5) == plain_unet_params(5, 32, 6, 4, 3, k=9, up=4)
    assert unet.param_count(unet.preset("tiny")) == plain_unet_params(1, 4, 2, 2, 3) == 4760
    with pytest.raises(ValueError, match="resolution"):
        unet.preset("paper")
    with pytest.raises(ValueError, match="unknown preset"):
        unet.preset("vnet")


def _apply(model, x, train=False):
    return nnx.jit(lambda m, x: m(x, train))(model, x)  # eager dispatch of every op is slow


def test_forward_shapes_3d_and_2d_odd_sizes():
    model = unet.build(unet.preset("tiny"))
    y = _apply(model, jnp.ones((1, 16, 24, 34, 1)), train=True)    # 1 pooling: even sizes
    assert y.shape == (1, 16, 24, 34, 3) and y.dtype == jnp.float32
    cfg2 = dataclasses.replace(unet.preset("paper2d"), levels=3, base=4, precision="fp32")
    model2 = unet.build(cfg2, in_channels=5)
    assert isinstance(model2, unet.UNet2D)
    assert _apply(model2, jnp.ones((2, 12, 20, 5))).shape == (2, 12, 20, 3)
    with pytest.raises(ValueError, match="expects"):
        model2(jnp.ones((1, 12, 20, 4, 5)))


@pytest.mark.parametrize("prec,dt", [("bf16", "bf16"), ("fp16", "f16")])
def test_precision_policy_casts_activations_not_params(prec, dt):
    cfg = dataclasses.replace(unet.preset("tiny"), precision=prec)
    model = unet.build(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    x = jnp.ones((1, 8, 8, 8, 1))
    jaxpr = str(jax.make_jaxpr(lambda x: model(x, train=False))(x))
    assert f"{dt}[1,8,8,8,4]" in jaxpr                             # activations in dt
    assert model(x).dtype == jnp.float32                             # logits float32


def test_batch_statistics_update_in_train_mode_only():
    model = unet.build(dataclasses.replace(unet.preset("tiny"), dropout=0.5))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 1)) + 3.0
    before = nnx.state(model, nnx.BatchStat)
    y_eval = _apply(model, x)
    np.testing.assert_array_equal(_apply(model, x), y_eval)         # eval: deterministic
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before,
                                     nnx.state(model, nnx.BatchStat)))
    _apply(model, x, train=True)
    m = model.down_1.units[0].act.mean[...]
    assert float(jnp.abs(m).max()) > 0                               # moved to the batch mean


def test_training_steps_reduce_the_loss():
    cfg = dataclasses.replace(unet.preset("tiny"), norm="inplace_abn")
    opt = optax.adam(1e-2)
    graphdef, state = step.init_state(unet.build(cfg), opt)
    layout = partition.layout(partition.make_mesh((1, 1, 1), devices=jax.devices()[:1]), "none")
    fn = step.make_train_step(graphdef, opt, losses.cross_entropy, layout)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1)))
    labels = (x[..., 0] > 0.5).astype(np.int32) + (x[..., 0] > 1.5)
    seen = []
    for _ in range(8):
        state, metrics = fn(state, *step.place_batch(layout, x, labels))
        seen.append(float(metrics["loss"]))
    assert seen[-1] < 0.7 * seen[0], seen


def test_custom_config_builds():
    cfg = ModelConfig(preset="custom", levels=3, base=4, convs_per_block=1, block="bottleneck",
                      norm="group", norm_groups=2, activation="relu", classes=2)
    assert _apply(unet.build(cfg), jnp.ones((1, 8, 8, 8, 1)), True).shape == (1, 8, 8, 8, 2)


def test_the_head_obeys_model_conv_as_every_conv():
    """The 1×1×1 head is built with ``model.conv`` too: with ``auto`` on the CPU it is a matmul
    (cpuconv.pointwise), with ``xla`` XLA's conv — which the memory planner's compiles need."""
    import dataclasses

    import jax

    from hrseg.nn import unet as _unet
    for kernel in ("auto", "xla"):
        model = _unet.build(dataclasses.replace(_unet.preset("tiny"), conv=kernel))
        assert model.head.impl == kernel
        x = jax.numpy.ones((1, 8, 8, 8, 1))
        text = jax.jit(lambda x, m=model: m(x, train=False)).lower(x).as_text()
        # the head's kernel reshaped to the matmul's (Cin, classes) operand, or not at all
        assert ("tensor<4x3xf32>" in text) == (kernel == "auto")
