"""Memory of a training step per device: what a user needs before renting devices.

    analytic    the estimate counted from the model's parts (no compilation)
    backward    the backward pass's peak from those parts, per platform (XLA:CPU widens bf16)
    compiled    the real step compiled on shapes (XLA's figures), and autodiff's residuals
    planner     the smallest partition that fits a per-device budget, confirmed by compiling
    splits      which meshes of n devices split a volume (pooling, padding, halo surface)
    levels      which levels to gather (model.gather_below) on a planned mesh
    confirm     compile a planned step here, or in a subprocess with enough fake CPU devices
    ablation    Wang et al.'s memory ablation table
    study       the notebooks' tables: analytic vs compiled, memory vs devices, paper schedule
    peak        real allocator peak of a training step on a GPU/TPU (None on CPU)

``hrseg.memory`` re-exports them: ``memory.estimate``, ``memory.measure``, ``memory.plan``, ...
"""
from hrseg.memory.ablation import (  # noqa: F401
    ABLATION,
    WANG_TABLE1,
    ablation,
    format_comparison,
    format_table,
    largest_bucket,
    paper_comparison,
    phantom_bucket,
)
from hrseg.memory.analytic import (  # noqa: F401
    MASK_BYTES,
    GiB,
    Tensor,
    activation_bytes,
    estimate,
    mesh_shape,
    platform_of,
    tensors,
)
from hrseg.memory.compiled import (  # noqa: F401
    abstract_step,
    measure,
    residuals,
)
from hrseg.memory.confirm import (  # noqa: F401
    CannotCompile,
    compile_step,
    compile_steps,
)
from hrseg.memory.peak import (  # noqa: F401
    peak_bytes_in_use,
    train_step_peak_bytes,
)
from hrseg.memory.planner import (  # noqa: F401
    Plan,
    confirm_plan,
    plan,
)
from hrseg.memory.study import (  # noqa: F401
    Compiled,
    analytic_vs_compiled,
    memory_vs_devices,
    paper_schedule,
)
