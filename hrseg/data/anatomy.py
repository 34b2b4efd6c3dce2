"""The synthetic abdomen: organ shapes, HU values and tumours, as numbers drawn from a seed.

A case is an :class:`Anatomy`: a few hundred numbers drawn from one seed (organ centres, radii,
HU values, the tumour list, smooth-noise lattices), in patient coordinates — RAS+ millimetres,
x towards the patient's right, y anterior, z superior, z = 0 at the bottom of the scan.
hrseg.data.painter evaluates it at the voxel centres of any axis-aligned block, so one case renders
at 512×512×150 for the dataset or at 64×64×32 in a test.

Shapes are implicit functions evaluated in each organ's bounding box only; irregularity comes
from smooth random fields (cubic B-splines through random lattice values), which cost a few
small matrix products per block instead of 3D Gaussian filters.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from hrseg.data.field import Field

F32 = np.float32


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


class Ellipsoid:
    """``q(p) = |R(p - c) / r|²`` (rotation about z by ``angle``); inside where q < 1."""

    def __init__(self, centre, radii, angle=0.0):
        self.c = np.asarray(centre, F32)
        self.r = np.asarray(radii, F32)
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def bounds(self, grow=1.0):
        ext = float(max(self.r[0], self.r[1])) * grow
        half = np.array([ext, ext, float(self.r[2]) * grow], F32)
        return self.c - half, self.c + half

    def q(self, x, y, z):
        dx, dy = (x - self.c[0])[:, None], (y - self.c[1])[None, :]
        u = (self.cos * dx + self.sin * dy) / self.r[0]
        v = (-self.sin * dx + self.cos * dy) / self.r[1]
        w = ((z - self.c[2]) / self.r[2]) ** 2
        return (u * u + v * v)[:, :, None] + w[None, None, :]


def disc(x, y, cx, cy, rx, ry):
    return ((x[:, None] - cx) / rx) ** 2 + ((y[None, :] - cy) / ry) ** 2 < 1


class Anatomy:
    """One synthetic abdomen (see the module docstring); all lengths in mm, values in HU."""

    def __init__(self, rng: np.random.Generator, fov: tuple[float, float], extent: float):
        def u(lo, hi):
            return _u(rng, lo, hi)

        self.fov, self.extent = fov, extent
        # Body outline: an ellipse, flatter at the back, slowly varying with z.
        self.ax = min(u(135, 170), 0.46 * fov[0])
        self.ay = min(u(100, 128), 0.40 * fov[1])
        self.ay_post = 0.88 * self.ay
        self.wobble = (u(0, 0.03), u(0, 2 * math.pi))
        self.s_amp, self.s_period, self.s_phase = u(0.0, 0.05), u(150, 400), u(0, 2 * math.pi)
        self.fat_sc = u(6, 35)                       # subcutaneous fat thickness
        self.wall = u(8, 15)                         # abdominal wall muscle thickness
        self.rho_w1 = 1 - self.fat_sc / self.ay      # normalised radius: fat | muscle
        self.rho_w0 = self.rho_w1 - self.wall / self.ay  # muscle | abdominal cavity
        self.hu_fat, self.hu_muscle = u(-115, -85), u(40, 60)
        self.table_y = -self.ay_post - u(4, 12)
        # Cavity filling: bowel loops (level band of a smooth field), gas, mesenteric fat.
        lo, hi = (-fov[0] / 2, -fov[1] / 2, 0.0), (fov[0] / 2, fov[1] / 2, extent)
        self.f_bowel, self.f_gas = Field(rng, lo, hi, u(22, 32)), Field(rng, lo, hi, 30.0)
        self.f_organ = Field(rng, lo, hi, 35.0)      # shared deformation of solid organs
        self.f_tex = Field(rng, lo, hi, 12.0)        # parenchymal texture
        self.bowel_band, self.gas_level = u(0.35, 0.6), u(1.2, 1.8)
        self.hu_bowel = u(20, 45)
        # Diaphragm: two domes; lungs above, abdomen below.
        self.z_dome = extent - u(15, 45)
        self.z_dome_l = self.z_dome - u(5, 20)
        # Spine and the structures around it.
        self.vb = (0.0, -self.ay_post + u(50, 62), u(17, 22))      # x, y, radius
        self.canal = (0.0, self.vb[1] - self.vb[2] - u(8, 11), u(7, 9))
        self.disc_period, self.disc_phase = u(30, 36), u(0, 36)
        self.hu_bone, self.hu_marrow = u(550, 800), u(180, 260)
        vb_front = self.vb[1] + self.vb[2]
        self.aorta = (u(-22, -12), vb_front + u(10, 16), u(10, 13), u(130, 190))
        r_ivc = u(11, 15)
        self.ivc = (u(18, 28), vb_front + u(12, 20), r_ivc, 0.75 * r_ivc)   # x, y, rx, ry
        self.rib_period, self.rib_phase = u(27, 34), u(0, 34)
        self.rib_low = self.z_dome - u(110, 140)     # lowest rib level (laterally)
        # Liver: up to three lobes, irregular, HU per the issue (~40-60).
        self.hu_liver = u(40, 60)
        rz = u(75, 95)
        self.lobes = [
            Ellipsoid((u(35, 55), u(-12, 8), self.z_dome - 0.9 * rz),
                      (u(62, 78), u(72, 88), rz), u(-0.2, 0.2)),
            Ellipsoid((u(-40, -15), u(28, 45), self.z_dome - u(45, 60)),
                      (u(45, 65), u(24, 34), u(32, 45)), u(-0.3, 0.1)),
            Ellipsoid((u(5, 20), u(-30, -20), self.z_dome - u(45, 60)), (18, 16, 30), 0.0),
        ]
        self.liver_amp = u(0.15, 0.3)
        right = self.lobes[0]
        self.gallbladder = None
        if rng.random() < 0.6:
            self.gallbladder = Ellipsoid(
                (right.c[0] - u(15, 30), right.c[1] + u(30, 45), right.c[2] - 0.5 * rz),
                (u(13, 18), u(12, 16), u(28, 38)), u(-0.6, 0.6))
            self.hu_gb = u(0, 15)
        self.spleen = Ellipsoid((-0.55 * self.ax, u(-45, -25), self.z_dome_l - u(50, 70)),
                                (u(22, 30), u(45, 60), u(40, 55)), u(0.4, 0.9))
        self.hu_spleen = self.hu_liver - u(-2, 10)
        self.stomach = Ellipsoid((u(-55, -35), u(25, 45), self.z_dome_l - u(35, 55)),
                                 (u(38, 50), u(28, 38), u(40, 55)), u(0.2, 0.6))
        zk = self.z_dome - u(125, 155)
        self.kidneys = [Ellipsoid((sx * u(62, 75), self.vb[1] + u(0, 12), zk + dz),
                                  (u(24, 30), u(20, 26), u(45, 58)), -sx * u(0.3, 0.6))
                        for sx, dz in ((1, 0.0), (-1, u(10, 25)))]
        self.hu_kidney = u(140, 190)
        self.heart = Ellipsoid((u(-35, -15), u(35, 55), self.z_dome_l + u(45, 60)),
                               (u(60, 75), u(45, 55), u(50, 60)), u(0.2, 0.5))
        self.noise_sd = u(10, 20)
        self.vessels = self.tumours = ()             # filled by sample_liver_contents

    # --- 2D/1D helpers -------------------------------------------------------------------
    def rho(self, x, y):
        """Normalised body radius in the axial plane (1 = skin), shape (len x, len y)."""
        ay = np.where(y > 0, self.ay, self.ay_post).astype(F32)
        xx, yy = (x / self.ax)[:, None], (y / ay)[None, :]
        r = np.sqrt(xx * xx + yy * yy)
        theta = np.arctan2(yy, xx)
        return r * (1 + self.wobble[0] * np.sin(2 * theta + self.wobble[1]))

    def scale(self, z):
        return (1 + self.s_amp * np.sin(2 * np.pi * z / self.s_period + self.s_phase)).astype(F32)

    def dome(self, x, y):
        """Height of the diaphragm (mm) over the axial plane; the lungs are above it."""
        def one(px, top):
            return top - 0.0045 * ((x[:, None] - px) ** 2 + 1.6 * (y[None, :] + 10) ** 2)
        return np.maximum(one(0.3 * self.ax, self.z_dome), one(-0.3 * self.ax, self.z_dome_l))

    def cavity(self, x, y, z):
        """Inside the abdominal/thoracic cavity (within the muscle wall), 3 mm margin."""
        margin = 3.0 / self.ay
        return self.rho(x, y)[:, :, None] < ((self.rho_w0 - margin) * self.scale(z))[None, None]

    def liver_bounds(self):
        los, his = zip(*(lobe.bounds(1 + self.liver_amp) for lobe in self.lobes))
        return np.min(los, axis=0), np.max(his, axis=0)

    def liver_mask(self, x, y, z):
        """Liver (vessels and tumours inside it included, gallbladder and IVC excluded)."""
        q = np.minimum.reduce([lobe.q(x, y, z) for lobe in self.lobes])
        q += self.liver_amp * self.f_organ(x, y, z)
        inside = (q < 1) & self.cavity(x, y, z)
        inside &= z[None, None, :] < self.dome(x, y)[:, :, None] - 2
        inside &= ~disc(x, y, *self.ivc)[:, :, None]
        if self.gallbladder is not None:
            inside &= self.gallbladder.q(x, y, z) >= 1
        return inside


def sample_liver_contents(a: Anatomy, rng: np.random.Generator, cell: float = 3.0) -> None:
    """Vessels and tumours: positions drawn from the liver evaluated on a coarse grid."""
    lo, hi = a.liver_bounds()
    axes = [np.arange(l_, h_ + cell, cell, dtype=F32) for l_, h_ in zip(lo, hi)]
    mask = a.liver_mask(*axes)
    if not mask.any():
        return
    depth = ndimage.distance_transform_edt(mask) * cell        # mm to the liver surface
    pts = np.stack(np.nonzero(mask), 1)
    world = np.stack([axes[d][pts[:, d]] for d in range(3)], 1)
    d = depth[mask]
    # Portal/hepatic vessels: tubes from the hilum to deep points, brighter than parenchyma.
    deep = world[d >= 8]
    if len(deep):
        hilum = deep[np.argmax(depth[mask][d >= 8])]
        a.vessels = [(hilum, deep[rng.integers(len(deep))], _u(rng, 2.5, 6.0),
                      a.hu_liver + _u(rng, 35, 70)) for _ in range(int(rng.integers(5, 10)))]
    # Tumours: 0-10, radius log-uniform 2-40 mm (4-80 mm across), hypodense, some necrotic.
    n = 0 if rng.random() < 0.08 else int(rng.integers(1, 11))
    tumours = []
    for _ in range(n):
        r = math.exp(_u(rng, math.log(2.0), math.log(40.0)))
        ok = d >= min(0.6 * r, d.max())
        centre = world[ok][rng.integers(ok.sum())]
        tumours.append({
            "centre": centre, "r": r, "axes": (1.0, _u(rng, 0.75, 1.0), _u(rng, 0.75, 1.0)),
            "angle": _u(rng, 0, math.pi), "lobes": rng.normal(0, 1, 4) * _u(rng, 0, 0.12),
            "hu": a.hu_liver - _u(rng, 20, 50), "core": _u(rng, 10, 25) if r > 12 else 0.0})
    a.tumours = tumours
