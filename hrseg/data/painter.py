"""Painting an :class:`~hrseg.data.anatomy.Anatomy` onto voxels: HU values and 0/1/2 labels.

:func:`paint` renders the anatomy at the voxel centres ``xs × ys × zs`` of any axis-aligned
block. Each structure is evaluated in its own bounding box only, and later structures paint
over earlier ones (body wall, cavity, spine, organs, liver with vessels and tumours, ribs), so
big volumes render slab by slab with small temporaries (hrseg.data.phantom does that).
"""
from __future__ import annotations

import math

import numpy as np

from hrseg.data.anatomy import F32, Anatomy, Ellipsoid, disc


class Block:
    """Voxel centres being painted (ascending RAS coordinates) and their HU / label arrays."""

    def __init__(self, xs, ys, zs):
        self.xs, self.ys, self.zs = (np.asarray(c, F32) for c in (xs, ys, zs))
        shape = (len(xs), len(ys), len(zs))
        self.hu = np.full(shape, -1000.0, F32)
        self.lab = np.zeros(shape, np.uint8)

    def box(self, lo, hi):
        """Index slices of the voxels inside the world box ``[lo, hi]``, or None if empty."""
        sl = []
        for c, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            i0, i1 = np.searchsorted(c, a), np.searchsorted(c, b, side="right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        return tuple(sl)

    def coords(self, sl):
        return self.xs[sl[0]], self.ys[sl[1]], self.zs[sl[2]]


def _paint_base(a: Anatomy, b: Block) -> None:
    """Air, table, subcutaneous fat, muscle wall, cavity (bowel loops, gas, fat), lungs."""
    x, y, z = b.xs, b.ys, b.zs
    table = (((y > a.table_y - 14) & (y < a.table_y))[None, :]
             & (np.abs(x) < 0.42 * a.fov[0])[:, None])
    shell = table & ((y < a.table_y - 12) | (y > a.table_y - 2))[None, :]
    b.hu[table] = -850.0
    b.hu[shell] = 150.0
    r = a.rho(x, y)[:, :, None] / a.scale(z)[None, None, :]
    np.copyto(b.hu, F32(a.hu_fat), where=r < 1)
    np.copyto(b.hu, F32(a.hu_muscle), where=r < a.rho_w1)
    cav = r < a.rho_w0
    fb = a.f_bowel(x, y, z)
    soft = np.abs(fb) < a.bowel_band
    np.copyto(b.hu, F32(a.hu_fat + 10), where=cav)
    np.copyto(b.hu, F32(a.hu_bowel), where=cav & soft)
    gas = a.f_gas(x, y, z) > a.gas_level
    np.copyto(b.hu, F32(-950.0), where=cav & soft & gas)
    # Lungs (and the heart) above the diaphragm: only the z range above its lowest point.
    dome = a.dome(x, y)
    k0 = int(np.searchsorted(z, dome.min()))
    if k0 < len(z):
        zz = z[k0:]
        above = (zz[None, None, :] > dome[:, :, None]) & cav[:, :, k0:]
        sub = b.hu[:, :, k0:]
        np.copyto(sub, F32(-860.0) + 25 * a.f_tex(x, y, zz), where=above)
        np.copyto(sub, F32(45.0), where=above & (a.heart.q(x, y, zz) < 1))


def _paint_muscles_spine(a: Anatomy, b: Block) -> None:
    x, y, z = b.xs, b.ys, b.zs
    vx, vy, vr = a.vb
    cx, cy, cr = a.canal
    m2d = np.zeros((len(x), len(y)), bool)
    for sx in (-1, 1):   # paraspinal muscles (under the skin), psoas (growing downwards)
        m2d |= disc(x, y, sx * (cr + 22), cy - 6, 24, 20)
    m2d &= a.rho(x, y) < (1 - a.s_amp) * (1 - 6 / a.ay)
    b.hu[m2d] = a.hu_muscle
    zf = np.clip(1 - z / (a.z_dome - 60), 0, 1)        # 0 at the upper abdomen, 1 below
    for sx in (-1, 1):
        rad = 6 + 16 * zf
        d = ((x[:, None, None] - sx * (vr + 18)) ** 2
             + (y[None, :, None] - (vy + 4)) ** 2) < (rad ** 2)[None, None, :]
        np.copyto(b.hu, F32(a.hu_muscle), where=d & (zf > 0)[None, None, :])
    # Vertebrae: cortical rim, marrow, discs; posterior arch, spinous and transverse processes.
    phase = np.mod(z - a.disc_phase, a.disc_period)
    between = phase < 8                                 # intervertebral disc levels
    body = disc(x, y, vx, vy, vr, vr * 0.9)
    rim = body & ~disc(x, y, vx, vy, vr - 2.5, vr * 0.9 - 2.5)
    val = np.where(between, 90.0, a.hu_marrow).astype(F32)
    sl = b.box((vx - vr - 40, cy - 45, -np.inf), (vx + vr + 40, vy + vr, np.inf))
    if sl is not None:
        xs, ys, _ = b.coords(sl)
        sub = b.hu[sl]
        bo, ri = body[sl[0], sl[1]], rim[sl[0], sl[1]]
        np.copyto(sub, np.broadcast_to(val[sl[2]], sub.shape), where=bo[:, :, None])
        np.copyto(sub, F32(a.hu_bone), where=ri[:, :, None] & ~between[sl[2]][None, None, :])
        arch = disc(xs, ys, cx, cy, cr + 5, cr + 5)
        spinous = disc(xs, ys, cx, cy - cr - 14, 4.5, 16)
        trans = disc(xs, ys, cx, cy + 2, 38, 5)
        seg = phase[sl[2]]
        bone3 = (arch[:, :, None] | (spinous[:, :, None] & (seg < 22)[None, None, :])
                 | (trans[:, :, None] & ((seg > 10) & (seg < 20))[None, None, :]))
        np.copyto(sub, F32(a.hu_bone * 0.8), where=bone3)
        np.copyto(sub, F32(10.0), where=disc(xs, ys, cx, cy, cr, cr)[:, :, None])
    ax_, ay_, ar, ahu = a.aorta
    np.copyto(b.hu, F32(ahu), where=disc(x, y, ax_, ay_, ar, ar)[:, :, None])
    np.copyto(b.hu, F32(ahu - 30), where=disc(x, y, *a.ivc)[:, :, None])


def _paint_ribs(a: Anatomy, b: Block) -> None:
    """Ribs in the muscle wall: inclined rings above the costal margin; cartilage in front."""
    x, y, z = b.xs, b.ys, b.zs
    k0 = int(np.searchsorted(z, a.rib_low - 10))
    if k0 >= len(z):
        return
    rho = a.rho(x, y)
    band = (rho > a.rho_w0 - 0.08) & (rho < a.rho_w1 + 0.02)
    ii, jj = np.nonzero(band)
    if len(ii) == 0:
        return
    zz = z[k0:]
    ang = np.arctan2(y[jj], x[ii])                    # 0 right, pi/2 anterior
    post = np.abs(np.mod(ang + np.pi / 2 + np.pi, 2 * np.pi) - np.pi) / np.pi  # 0 back, 1 front
    front = post > 0.85
    back = post < 0.12
    rr = (rho[ii, jj] - (a.rho_w0 + 0.35 * (a.rho_w1 - a.rho_w0)))[:, None] * a.ay
    rr = rr / a.scale(zz)[None, :]
    # Ribs fall ~140 mm from the spine to the front: short oblique sections in each slice.
    zc = zz[None, :] + 140 * post[:, None] - a.rib_phase
    dz = np.mod(zc, a.rib_period) - a.rib_period / 2
    q = (rr / 5.5) ** 2 + (dz / 5.0) ** 2
    low = a.rib_low + 50 * post                       # costal margin: lower at the sides
    ok = (zz[None, :] > low[:, None]) & ~back[:, None] & (q < 1)
    vals = np.where(q < 0.45, a.hu_marrow, a.hu_bone).astype(F32)
    vals = np.where(front[:, None], F32(120.0), vals)
    sub = b.hu[ii, jj, k0:]
    b.hu[ii, jj, k0:] = np.where(ok, vals, sub)


def organ_region(a: Anatomy, b: Block, ell: Ellipsoid, amp: float, grow: float = 1.3):
    """``(slices, q, inside)`` of a solid organ in the block (its bounding box only; None ×3
    when it misses the block): the ellipsoid deformed by ``amp`` × the shared organ field,
    inside the cavity and below the diaphragm."""
    sl = b.box(*ell.bounds(grow))
    if sl is None:
        return None, None, None
    x, y, z = b.coords(sl)
    q = ell.q(x, y, z)
    if amp:
        q += amp * a.f_organ(x, y, z)
    inside = (q < 1) & a.cavity(x, y, z) & (z[None, None] < a.dome(x, y)[:, :, None] - 2)
    return sl, q, inside


KIDNEY_AMP = 0.05        # kidney deformation by the organ field (kits_phantom labels the same)


def renal_sinus(k: Ellipsoid) -> Ellipsoid:
    """The fat of a kidney's hilum (medial side): not kidney parenchyma."""
    return Ellipsoid(k.c + np.array([-np.sign(k.c[0]) * 0.6 * k.r[0], 0, 0], F32),
                     k.r * np.array([0.45, 0.35, 0.5], F32))


def paint_kidneys(a: Anatomy, b: Block) -> None:
    """Cortex, medulla (55 HU darker) and sinus fat of both kidneys."""
    for k in a.kidneys:
        sl, q, inside = organ_region(a, b, k, KIDNEY_AMP)
        if sl is None:
            continue
        sub = b.hu[sl]
        np.copyto(sub, F32(a.hu_kidney), where=inside)
        np.copyto(sub, F32(a.hu_kidney - 55), where=inside & (q < 0.4))
        np.copyto(sub, F32(-60.0), where=inside & (renal_sinus(k).q(*b.coords(sl)) < 1))


def _paint_organs(a: Anatomy, b: Block) -> None:
    """Kidneys, spleen, stomach (with gas anteriorly): below the diaphragm, inside the cavity."""
    def region(ell, amp, grow=1.3):
        return organ_region(a, b, ell, amp, grow)

    paint_kidneys(a, b)
    sl, q, inside = region(a.spleen, 0.2)
    if sl is not None:
        np.copyto(b.hu[sl], F32(a.hu_spleen), where=inside)
    sl, q, inside = region(a.stomach, 0.15)
    if sl is not None:
        y = b.coords(sl)[1]
        gas = (y > a.stomach.c[1] + 0.35 * a.stomach.r[1])[None, :, None]
        np.copyto(b.hu[sl], F32(15.0), where=inside)
        np.copyto(b.hu[sl], F32(-950.0), where=inside & gas & (q < 0.8))


def _segment_d2(x, y, z, p0, p1):
    d = (p1 - p0).astype(F32)
    dx, dy, dz = (x - p0[0])[:, None, None], (y - p0[1])[None, :, None], (z - p0[2])[None, None, :]
    t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(float(d @ d), 1e-6), 0, 1)
    return (dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2


def _paint_liver(a: Anatomy, b: Block) -> None:
    sl = b.box(*a.liver_bounds())
    if sl is None:
        return
    x, y, z = b.coords(sl)
    liver = a.liver_mask(x, y, z)
    hu, lab = b.hu[sl], b.lab[sl]
    np.copyto(hu, F32(a.hu_liver) + 4 * a.f_tex(x, y, z), where=liver)
    lab[liver] = 1
    for p0, p1, r, val in a.vessels:
        vs = b.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if vs is not None:
            d2 = _segment_d2(*b.coords(vs), p0, p1)
            np.copyto(b.hu[vs], F32(val), where=(d2 < r * r) & (b.lab[vs] == 1))
    if a.gallbladder is not None:
        gs = b.box(*a.gallbladder.bounds())
        if gs is not None:
            gx, gy, gz = b.coords(gs)
            inside = (a.gallbladder.q(gx, gy, gz) < 1) & a.cavity(gx, gy, gz)
            np.copyto(b.hu[gs], F32(a.hu_gb), where=inside)
    for t in a.tumours:
        _paint_tumour(t, b)


def _paint_tumour(t: dict, b: Block) -> None:
    c, r = t["centre"], t["r"]
    ext = r * 1.35
    sl = b.box(c - ext, c + ext)
    if sl is None:
        return
    x, y, z = b.coords(sl)
    dx, dy, dz = (x - c[0])[:, None, None], (y - c[1])[None, :, None], (z - c[2])[None, None, :]
    cs, sn = math.cos(t["angle"]), math.sin(t["angle"])
    u, v = cs * dx + sn * dy, -sn * dx + cs * dy
    d2 = (u / t["axes"][0]) ** 2 + (v / t["axes"][1]) ** 2 + (dz / t["axes"][2]) ** 2
    inv = 1 / np.sqrt(d2 + 1e-6)
    ux, uy, uz = u * inv, v * inv, dz * inv
    k = t["lobes"]
    m = 1 + k[0] * ux * uy + k[1] * uy * uz + k[2] * ux * uz + k[3] * (ux * ux - uy * uy)
    q = d2 / (r * m) ** 2
    lab = b.lab[sl]
    inside = (q < 1) & (lab >= 1)
    vals = np.where(q < 0.3, F32(t["hu"] - t["core"]), F32(t["hu"]))
    np.copyto(b.hu[sl], vals, where=inside)
    lab[inside] = 2


def paint(a: Anatomy, xs, ys, zs) -> Block:
    """Sharp (noise-free) HU and labels of the anatomy at the voxel centres xs × ys × zs."""
    b = Block(xs, ys, zs)
    _paint_base(a, b)
    _paint_muscles_spine(a, b)
    _paint_organs(a, b)
    _paint_liver(a, b)
    _paint_ribs(a, b)
    return b
