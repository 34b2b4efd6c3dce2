"""The PyTorch side of benchmarks/speed.py: the same U-Net in PyTorch, installed as users do.

``make_venv(DIR)`` creates a virtual environment and ``pip install``s the pinned CPU build of
PyTorch into it (``torch==2.13.0+cpu``, PyTorch's own CPU wheel) — the baseline is what a
user who installs PyTorch gets, never a hand-placed copy on another interpreter's path.
``worker(...)`` builds the network with PyTorch's own CPU settings from its docs (intra-op
threads = cores; ``channels_last_3d`` memory format when asked) and reports what it runs on:
``torch.__config__.show()`` (BLAS, oneDNN), ``torch.get_num_threads()``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TORCH_PIN = "torch==2.13.0+cpu"


def venv_python(folder: str | Path) -> Path:
    return Path(folder) / "bin" / "python"


def has_torch(python: str | Path, path: str | None = None) -> bool:
    """Whether ``import torch`` works in ``python`` (with ``path`` in front of its path)."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    return subprocess.run([str(python), "-c", "import torch"], capture_output=True,
                          check=False, env=env).returncode == 0


def make_venv(folder: str | Path, pin: str = TORCH_PIN) -> Path:
    """A venv at ``folder`` with ``pin`` and numpy installed (kept when it already has torch);
    returns its interpreter. pip's own output goes to stderr."""
    py = venv_python(folder)
    if py.exists() and has_torch(py):
        return py
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", pin, "numpy"], check=True,
                   stdout=sys.stderr)
    if not has_torch(py):
        raise RuntimeError(f"{folder}: torch does not import after pip install {pin}")
    return py


def info() -> dict:
    import torch
    return {"torch": torch.__version__, "num_threads": torch.get_num_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "config": torch.__config__.show()}


def worker(size: int, threads: int, arch: str, channels_last: bool = False):
    """(step(), infer()) closures of the PyTorch U-Net; each returns when its work is done."""
    import numpy as np
    import torch
    from torch import nn
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    levels, base, convs, classes = map(int, arch.split(","))  # of the hrseg preset

    def block(a, b):
        mods = []
        for i in range(convs):
            mods += [nn.Conv3d(a if i == 0 else b, b, 3, padding=1, bias=False),
                     nn.BatchNorm3d(b, eps=1e-6, momentum=0.1), nn.LeakyReLU(0.1)]
        return nn.Sequential(*mods)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            f = [base * 2 ** i for i in range(levels)]
            self.down = nn.ModuleList([block(1 if i == 0 else f[i - 1], f[i])
                                       for i in range(levels)])
            self.ups = nn.ModuleList([nn.ConvTranspose3d(f[i + 1], f[i], 2, 2, bias=False)
                                      for i in range(levels - 1)])
            self.up = nn.ModuleList([block(2 * f[i], f[i]) for i in range(levels - 1)])
            self.head = nn.Conv3d(f[0], classes, 1, bias=False)

        def forward(self, x):  # (B, C, X, Y, Z)
            skips = []
            for i, blk in enumerate(self.down):
                x = blk(x)
                if i < levels - 1:
                    skips.append(x)
                    x = nn.functional.max_pool3d(x, 2)
            for i in reversed(range(levels - 1)):
                x = self.up[i](torch.cat([self.ups[i](x), skips[i]], 1))
            return self.head(x)

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = UNet().to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 1, size, size, size)).astype(np.float32))
    x = x.contiguous(memory_format=fmt)
    y = torch.from_numpy(rng.integers(0, classes, (1, size, size, size)).astype(np.int64))

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())

    def infer():
        model.eval()
        with torch.no_grad():
            model(x).argmax(1)
    return step, infer
