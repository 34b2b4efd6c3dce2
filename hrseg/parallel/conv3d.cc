// A direct VALID, stride-1 3D convolution for XLA:CPU, channels innermost (issue 33).
//
//   y[n, x, y, z, o] = sum_{a, b, c, i} xp[n, x + a, y + b, z + c, i] * w[a, b, c, i, o]
//
// xp (N, X', Y', Z', Cin) float32, w (kd, kh, kw, Cin, Cout) float32 -> y (N, X, Y, Z, Cout).
// Each output row (n, x, y) is computed in tiles of kRows z positions x kLanes output
// channels held in 2 * kRows vector registers (AVX-512: 12 x 32 in 24 of its 32 registers;
// AVX2: 6 x 16 in 12 of 16); for a tap row (a, b) the kw * Cin inputs of one z position lie
// side by side in xp, so the reduction is one contiguous loop of length kw * Cin against the
// weights packed per kLanes output channels. No padded grid, no im2col copy: every output is
// computed once, from xp as it is; zero padding around xp (attributes pad_x/y/z) is read in
// place: tap rows in it are skipped, z edges staged with zeros. Rows are shared among XLA's
// intra-op threads.
// Every output sums its terms in the same order whichever vector width is built, so the
// AVX-512 and AVX2 builds give the same bits.
// Built by hrseg/parallel/native.py (g++ -O3 -mavx2 -mfma [-mavx512f]) and called through
// jax.ffi.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Volume = ffi::Buffer<ffi::F32, 5>;   // (N, X, Y, Z, C) or (kd, kh, kw, Cin, Cout)

namespace {

// ---- one vector register of floats; the ...N forms touch only the first n lanes (n <= 0:
// none, no memory read or written)
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
constexpr int kRows = 12;        // z positions per tile
#define HRSEG_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
inline __mmask16 Mask(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
}
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Bcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec LoadN(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
inline void StoreN(float* p, Vec v, int64_t n) { _mm512_mask_storeu_ps(p, Mask(n), v); }
constexpr bool kAvx512 = true;
#else
using Vec = __m256;
constexpr int64_t kWidth = 8;
constexpr int kRows = 6;
#define HRSEG_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
inline __m256i Mask(int64_t n) {
  const int32_t k = static_cast<int32_t>(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec LoadN(const float* p, int64_t n) { return _mm256_maskload_ps(p, Mask(n)); }
inline void StoreN(float* p, Vec v, int64_t n) { _mm256_maskstore_ps(p, Mask(n), v); }
constexpr bool kAvx512 = false;
#endif
constexpr int64_t kLanes = 2 * kWidth;   // output channels per tile (two registers)

// xp, yp, zp: the input's extent; px, py, pz: its implicit zero rows before the first (the
// forward only: reads outside the input are zeros, so the caller need not pad it)
struct Geom {
  int64_t n, xp, yp, zp, cin, x, y, z, cout, kd, kh, kw, blocks, px = 0, py = 0, pz = 0;
};

// One tile: M z positions x kLanes output channels, written to `out` (y at [n, x, y, z0, o0]);
// `valid` channels are kept. rows[t]: the input of tap row t (kw·Cin values per z position
// from the tile's first z), taps[t]: its weights' offset in the packed block `wp`; tap rows
// that fall in the zero padding are left out. The 2·M accumulators are named variables, not
// an array, so that they stay in registers.
template <int M>
inline void Tile(const float* const* rows, const int64_t* taps, int64_t nt, const float* wp,
                 float* out, const Geom& g, int64_t valid) {
#define HRSEG_ZERO(m) Vec lo##m = Zero(), hi##m = Zero();
  HRSEG_ROWS(HRSEG_ZERO)
  const int64_t k_len = g.kw * g.cin, cin = g.cin;
  for (int64_t t = 0; t < nt; ++t) {
    const float* row = rows[t];
    const float* w = wp + taps[t];
    for (int64_t k = 0; k < k_len; ++k, w += kLanes) {
      const Vec w0 = Load(w), w1 = Load(w + kWidth);
#define HRSEG_FMA(m)                                                  \
  if constexpr (M > m) {                                              \
    const Vec v = Bcast(row + m * cin + k);                           \
    lo##m = Fma(v, w0, lo##m);                                        \
    hi##m = Fma(v, w1, hi##m);                                        \
  }
      HRSEG_ROWS(HRSEG_FMA)
    }
  }
#define HRSEG_STORE(m)                                                \
  if constexpr (M > m) {                                              \
    float* o = out + m * g.cout;                                      \
    if (valid == kLanes) {                                            \
      Store(o, lo##m);                                                \
      Store(o + kWidth, hi##m);                                       \
    } else {                                                          \
      StoreN(o, lo##m, valid);                                        \
      StoreN(o + kWidth, hi##m, valid - kWidth);                      \
    }                                                                 \
  }
  HRSEG_ROWS(HRSEG_STORE)
}

using TileFn = void (*)(const float* const*, const int64_t*, int64_t, const float*, float*,
                        const Geom&, int64_t);
template <size_t... I>
constexpr std::array<TileFn, kRows + 1> MakeTiles(std::index_sequence<I...>) {
  return {nullptr, Tile<static_cast<int>(I) + 1>...};
}
constexpr auto kTiles = MakeTiles(std::make_index_sequence<kRows>());

// Output rows [r0, r1) of the flattened (n, x, y) grid. Per row, the tap rows (a, b) whose
// input row lies inside the input; per tile of z positions, their inputs read in place, or,
// for a tile whose window reaches into the z padding, copied with zeros into `stage`.
void Rows(const float* xp, const float* packed, float* y, const Geom& g, int64_t r0,
          int64_t r1) {
  const int64_t block = g.kd * g.kh * g.kw * g.cin * kLanes, k_len = g.kw * g.cin;
  const int64_t span = (kRows + g.kw - 1) * g.cin, nrows = g.kd * g.kh;
  std::vector<float> stage(nrows * span);
  std::vector<const float*> base(nrows), rows(nrows);
  std::vector<int64_t> taps(nrows);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t yy = r % g.y, xx = (r / g.y) % g.x, nn = r / (g.y * g.x);
    int64_t nt = 0;
    for (int64_t a = 0; a < g.kd; ++a) {
      const int64_t ix = xx + a - g.px;
      if (ix < 0 || ix >= g.xp) continue;
      for (int64_t b = 0; b < g.kh; ++b) {
        const int64_t iy = yy + b - g.py;
        if (iy < 0 || iy >= g.yp) continue;
        base[nt] = xp + ((nn * g.xp + ix) * g.yp + iy) * g.zp * g.cin;
        taps[nt++] = (a * g.kh + b) * k_len * kLanes;
      }
    }
    float* out = y + r * g.z * g.cout;
    for (int64_t z0 = 0; z0 < g.z; z0 += kRows) {
      const int64_t m = std::min<int64_t>(kRows, g.z - z0), s = z0 - g.pz, len = m + g.kw - 1;
      if (s >= 0 && s + len <= g.zp) {
        for (int64_t t = 0; t < nt; ++t) rows[t] = base[t] + s * g.cin;
      } else {   // zeros where the window leaves the input along z
        for (int64_t t = 0; t < nt; ++t) {
          float* st = stage.data() + t * span;
          for (int64_t q = 0; q < len; ++q) {
            const int64_t iz = s + q;
            if (iz < 0 || iz >= g.zp) {
              std::fill(st + q * g.cin, st + (q + 1) * g.cin, 0.0f);
            } else {
              std::copy(base[t] + iz * g.cin, base[t] + (iz + 1) * g.cin, st + q * g.cin);
            }
          }
          rows[t] = st;
        }
      }
      for (int64_t cb = 0; cb < g.blocks; ++cb) {
        const int64_t valid = std::min(kLanes, g.cout - cb * kLanes);
        kTiles[m](rows.data(), taps.data(), nt, packed + cb * block,
                  out + z0 * g.cout + cb * kLanes, g, valid);
      }
    }
  }
}

// Units [0, units) shared among the caller and up to threads-1 tasks of XLA's intra-op pool:
// each runner takes units until none is left (a unit's result must not depend on which
// runner computed it: results stay the same bits whatever the timing). A task the
// pool starts late finds none and returns; the caller waits only for units being computed
// (taken by a runner), never for a queued task, so a busy pool cannot deadlock it.
struct Shared {
  std::function<void(int64_t unit)> fn;
  int64_t units = 0;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t u; (u = next.fetch_add(1)) < units;) {
      fn(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t units,
                 std::function<void(int64_t)> fn) {
  auto shared = std::make_shared<Shared>();
  shared->fn = std::move(fn);
  shared->units = units;
  for (int64_t t = 1; t < std::min(threads, units); ++t) {
    pool.Schedule([shared] { shared->Run(); });
  }
  shared->Run();
  while (shared->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

using Floats = std::unique_ptr<float, decltype(&std::free)>;

Floats Zeros(int64_t n) {   // 64-byte aligned, zero-filled; null if out of memory
  const int64_t bytes = ((std::max<int64_t>(1, n) * 4 + 63) / 64) * 64;
  Floats p(static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
  if (p) std::fill(p.get(), p.get() + bytes / 4, 0.0f);
  return p;
}

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

// The geometry of a VALID conv of xp (N, X', Y', Z', Cin), with px / py / pz zero rows before
// it and as many after as y's extent needs, by a kernel (kd, kh, kw, Cin, Cout) into
// y (N, X, Y, Z, Cout); false when the three shapes and the padding do not form one.
template <typename D>
bool MakeGeom(const D& xd, const D& wd, const D& yd, Geom& g, int64_t px = 0, int64_t py = 0,
              int64_t pz = 0) {
  g = Geom{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4],
           wd[0], wd[1], wd[2], (wd[4] + kLanes - 1) / kLanes, px, py, pz};
  // the rows after the input: y's extent + k - 1 - (padding before + the input's extent)
  const int64_t hx = g.x + g.kd - 1 - px - g.xp, hy = g.y + g.kh - 1 - py - g.yp,
                hz = g.z + g.kw - 1 - pz - g.zp;
  return wd[3] == g.cin && wd[4] == g.cout && yd[0] == g.n && px >= 0 && py >= 0 && pz >= 0 &&
         hx >= 0 && hy >= 0 && hz >= 0 && g.x > 0 && g.y > 0 && g.z > 0;
}

// A VALID conv of xp as it is (no padding): the weight gradient's geometry.
template <typename D>
bool MakeValidGeom(const D& xd, const D& wd, const D& yd, Geom& g) {
  return MakeGeom(xd, wd, yd, g) && g.x == g.xp - g.kd + 1 && g.y == g.yp - g.kh + 1 &&
         g.z == g.zp - g.kw + 1;
}

ffi::Error Conv3d(ffi::ThreadPool pool, Volume xp, Volume w, ffi::Result<Volume> y,
                  int64_t pad_x, int64_t pad_y, int64_t pad_z) {
  Geom g;
  if (!MakeGeom(xp.dimensions(), w.dimensions(), y->dimensions(), g, pad_x, pad_y, pad_z)) {
    return ffi::Error::InvalidArgument("hrseg conv3d: shapes do not form a VALID conv");
  }
  // weights packed per block of 16 output channels: [block][a][b][c][i][16], zero-filled
  const int64_t taps = g.kd * g.kh * g.kw, block = taps * g.cin * kLanes;
  Floats packed = Zeros(g.blocks * block);
  if (!packed) return ffi::Error::Internal("hrseg conv3d: out of memory");
  const float* wv = w.typed_data();
  for (int64_t t = 0; t < taps * g.cin; ++t) {
    for (int64_t o = 0; o < g.cout; ++o) {
      packed.get()[(o / kLanes) * block + t * kLanes + o % kLanes] = wv[t * g.cout + o];
    }
  }
  const int64_t rows = g.n * g.x * g.y, threads = Threads(pool);
  const int64_t per = std::max<int64_t>(1, rows / (8 * threads));
  const float *x = xp.typed_data(), *wp = packed.get();
  float* out = y->typed_data();
  ParallelFor(pool, threads, (rows + per - 1) / per, [&](int64_t u) {
    Rows(x, wp, out, g, u * per, std::min(rows, (u + 1) * per));
  });
  return ffi::Error::Success();
}

// ---- the weight gradient: dw[a, b, c, i, o] = sum_{n, x, y, z} xp[n, x+a, y+b, z+c, i] g[n, x, y, z, o]
// For a tap row (a, b), (c, i) is one index k = c * Cin + i whose input at z lies at
// z * Cin + k of the row: dw[a, b] is a sum over rows of Xrow^T (K = Z) @ Grow. A tile of 6 k
// x 16 o is held in registers over a chunk of rows; each runner sums into its own copy of dw.
template <int M>
inline void WTile(const float* x, const float* gr, const Geom& g, int64_t r0, int64_t r1,
                  int64_t a, int64_t b, int64_t k0, int64_t o0, float* dw) {
  const int64_t valid = std::min(kLanes, g.cout - o0), v1 = valid - kWidth;
  const bool full = valid == kLanes;
  float* d = dw + ((a * g.kh + b) * g.kw * g.cin + k0) * g.cout + o0;
#define HRSEG_WLOAD(m) Vec lo##m = Zero(), hi##m = Zero();
  HRSEG_ROWS(HRSEG_WLOAD)
  const int64_t cin = g.cin;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t yy = r % g.y, xx = (r / g.y) % g.x, nn = r / (g.y * g.x);
    const float* xr = x + (((nn * g.xp + xx + a) * g.yp + yy + b) * g.zp) * cin + k0;
    const float* grow = gr + r * g.z * g.cout + o0;
    for (int64_t z = 0; z < g.z; ++z, xr += cin, grow += g.cout) {
      const Vec g0 = full ? Load(grow) : LoadN(grow, valid);
      const Vec g1 = full ? Load(grow + kWidth) : LoadN(grow + kWidth, v1);
#define HRSEG_WFMA(m)                                                 \
  if constexpr (M > m) {                                              \
    const Vec v = Bcast(xr + m);                                      \
    lo##m = Fma(v, g0, lo##m);                                        \
    hi##m = Fma(v, g1, hi##m);                                        \
  }
      HRSEG_ROWS(HRSEG_WFMA)
    }
  }
// the chunk's sums added onto dw: a sum of per-chunk sums, not one running sum over all rows
#define HRSEG_WSTORE(m)                                                               \
  if constexpr (M > m) {                                                              \
    float* d0 = d + m * g.cout;                                                       \
    if (full) {                                                                       \
      Store(d0, Add(Load(d0), lo##m));                                                \
      Store(d0 + kWidth, Add(Load(d0 + kWidth), hi##m));                              \
    } else {                                                                          \
      StoreN(d0, Add(LoadN(d0, valid), lo##m), valid);                                \
      StoreN(d0 + kWidth, Add(LoadN(d0 + kWidth, v1), hi##m), v1);                    \
    }                                                                                 \
  }
  HRSEG_ROWS(HRSEG_WSTORE)
}

using WTileFn = void (*)(const float*, const float*, const Geom&, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, float*);
template <size_t... I>
constexpr std::array<WTileFn, kRows + 1> MakeWTiles(std::index_sequence<I...>) {
  return {nullptr, WTile<static_cast<int>(I) + 1>...};
}
constexpr auto kWTiles = MakeWTiles(std::make_index_sequence<kRows>());

ffi::Error Conv3dWeightGrad(ffi::ThreadPool pool, Volume xp, Volume gy, ffi::Result<Volume> dw) {
  Geom g;
  if (!MakeValidGeom(xp.dimensions(), dw->dimensions(), gy.dimensions(), g)) {
    return ffi::Error::InvalidArgument("hrseg conv3d weight gradient: shapes do not match");
  }
  const int64_t size = g.kd * g.kh * g.kw * g.cin * g.cout, k_len = g.kw * g.cin;
  const int64_t rows = g.n * g.x * g.y, threads = Threads(pool);
  // chunks of rows small enough that their inputs and gradients stay in L2 across the tiles
  const int64_t row_bytes = (g.kd * g.zp * g.cin + g.z * g.cout) * 4;
  // (at least 512 z positions per tile: its registers are loaded and stored once a chunk)
  const int64_t per = std::clamp<int64_t>(
      std::max<int64_t>((256 << 10) / std::max<int64_t>(1, row_bytes), (512 + g.z - 1) / g.z),
      1, rows);
  const int64_t chunks = (rows + per - 1) / per;
  // The runners share out the tiles of dw, not the rows: each tile of dw is summed by one
  // runner over all chunks in order, straight into dw. Its bits are those of one thread's
  // sum whichever runner computed it and however many there are (a resumed run repeats its
  // weight gradients bit for bit), and there are no partial copies of dw to add up (8 of
  // them cost more than the sums at the coarse levels, where dw is large and the rows few).
  const int64_t k_tiles = (k_len + kRows - 1) / kRows, o_tiles = (g.cout + kLanes - 1) / kLanes;
  const int64_t tiles = g.kd * g.kh * k_tiles * o_tiles;
  const int64_t units = std::min(tiles, threads);
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  const float *x = xp.typed_data(), *gr = gy.typed_data();
  ParallelFor(pool, threads, units, [&](int64_t u) {
    const int64_t t0 = u * tiles / units, t1 = (u + 1) * tiles / units;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * per, r1 = std::min(rows, r0 + per);
      for (int64_t t = t0; t < t1; ++t) {   // t = ((a * kh + b) * k_tiles + kt) * o_tiles + ot
        const int64_t ot = t % o_tiles, kt = (t / o_tiles) % k_tiles;
        const int64_t ab = t / (o_tiles * k_tiles), a = ab / g.kh, b = ab % g.kh;
        const int64_t k0 = kt * kRows;
        kWTiles[std::min<int64_t>(kRows, k_len - k0)](x, gr, g, r0, r1, a, b, k0, ot * kLanes,
                                                       out);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrsegConv3d, Conv3d,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Volume>()
                                  .Arg<Volume>()
                                  .Ret<Volume>()
                                  .Attr<int64_t>("pad_x")
                                  .Attr<int64_t>("pad_y")
                                  .Attr<int64_t>("pad_z"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrsegConv3dWeightGrad, Conv3dWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Volume>()
                                  .Arg<Volume>()
                                  .Ret<Volume>());

// Whether this CPU runs the build: AVX2 and FMA, and AVX-512F where it was built for it.
extern "C" int hrseg_conv3d_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         (!kAvx512 || __builtin_cpu_supports("avx512f"));
}

// The vector width built: 512 or 256 bits.
extern "C" int hrseg_conv3d_vector_bits() { return kAvx512 ? 512 : 256; }
