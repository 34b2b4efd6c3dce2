"""Memory of a training step per device: what a user needs before renting devices.

    footprint   analytic estimate, traced residuals, compiled measurement
    planner     the smallest partition that fits a per-device budget
    ablation    Wang et al.'s memory ablation table
    study       the notebooks' tables: analytic vs compiled, memory vs devices, paper schedule
    peak        real allocator peak of a training step on a GPU/TPU (None on CPU)

``hrseg.memory`` re-exports them: ``memory.estimate``, ``memory.measure``, ``memory.plan``, ...
"""
from hrseg.memory.ablation import (  # noqa: F401
    ABLATION,
    ablation,
    format_table,
)
from hrseg.memory.footprint import (  # noqa: F401
    MASK_BYTES,
    GiB,
    Tensor,
    abstract_step,
    activation_bytes,
    cross_entropy,
    estimate,
    make_mesh,
    make_optimizer,
    measure,
    mesh_shape,
    parse_bytes,
    peak_bytes_on_device,
    residuals,
    tensors,
)
from hrseg.memory.peak import (  # noqa: F401
    peak_bytes_in_use,
    train_step_peak_bytes,
)
from hrseg.memory.planner import (  # noqa: F401
    Plan,
    plan,
)
from hrseg.memory.study import (  # noqa: F401
    Compiled,
    analytic_vs_compiled,
    memory_vs_devices,
    paper_schedule,
)
