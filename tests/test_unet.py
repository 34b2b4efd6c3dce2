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


def test_wang_parameter_counts_by_hand():
    # baseline = mtf with a third conv per block and a head bias:
    #   + 27·(32² + 64² + 128² + 256² + 128² + 64² + 32²) = 2,930,688 conv weights
    #   + BN 2·(32 + 64 + 128 + 256 + 128 + 64 + 32)       =     1,408
    #   + head bias                                        =         3  -> 8,533,059
    assert unet.param_count(unet.preset("wang_baseline")) == 8_533_059
    # compact (K = 4, m = C/4): reduce cin·m + BN 2m; 3 × [dw 27m + pw m² + BN 2m];
    # restore m·C + BN 2C
    #   down_1 (1 -> 32, m 8)     24 + 3·296 + 320            =   1,232
    #   down_2 (32 -> 64, m 16)   544 + 3·720 + 1,152         =   3,856
    #   down_3 (64 -> 128, m 32)  2,112 + 3·1,952 + 4,352     =  12,320
    #   bottom (128 -> 256, m 64) 8,320 + 3·5,952 + 16,896    =  43,072
    #   up_3   8·256·128 + (256 -> 128: 8,256 + 5,856 + 4,352) = 280,608
    #   up_2   8·128·64 + (128 -> 64: 2,080 + 2,160 + 1,152)   =  70,928
    #   up_1   8·64·32 + (64 -> 32: 528 + 888 + 320)           =  18,120
    #   head   32·3 + 3                                        =      99
    #                                                             430,235
    assert unet.param_count(unet.preset("wang_compact")) == 430_235
    assert 430_235 / 8_533_059 < 0.30                                   # PM4's params target


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
