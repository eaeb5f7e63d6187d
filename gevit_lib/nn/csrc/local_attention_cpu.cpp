// Fused CPU kernel of GE-ViT / GSA-Net local attention: forward and recomputing backward.
//
// Written by hand because no library has it: neighbourhood-attention kernels (NATTEN, flex_attention) have neither
// the (output v, query g, key m) group axes nor a CPU backward. Same math and layouts as fast_attention.py:
//   L[v,g,m,d] = content[g,m,d] + spatial[v,g,d] + group[v,g,m]   (each already times `scale`; d = offset)
//   p = softmax over (m, d) of L for each (v, g); out[v] = sum_g sum_{m,d} p * value[m, x+d]
// The three terms are exponentiated at their own sizes, each shifted by its own maximum, and the score block is
// their product (no exponential over the G^3 P^2 block); the sum of the maxima bounds the row maximum, so the
// softmax is exact; a row whose bound underflows is recomputed the direct way. Nothing of size G^3 P^2 leaves the
// pixel: the backward pass recomputes the block from q, k, v and the saved log-normaliser. The spatial term is
// computed on the distinct rows of the positional table (see distinct_rows()): once for all v in p4 and p4m.
//
// Vectorised across pixels: one SIMD lane per pixel of a run of L consecutive pixels of one image row, or of the
// rows of several images side by side (L: 16 floats / 8 doubles with AVX-512, half that with AVX2), so every scalar
// formula above is one vector operation, and the key of offset (a, b) for the whole run is one unaligned load from a
// ring of P copied rows (see get_row()).
// Layouts: q, k, v [B,H,W,G,C,heads] with any strides (image n = b * heads + h; in GE-ViT views of the layer's one
// projection, channels-first in memory, read in place), pos [Gv,P*P,Dpos], grp [J,Dg], gidx [Gv,Gq,Gk] (int64);
// out [B,H,W,Gv,Dv,heads] in q's memory order (channels-first or -last), lse [N,H,W,Gv,Gq] (log row sums, see
// kExactRow), keep (dropout's kept lanes, a bit per lane and score); the backward pass reads grad_out with any
// strides and writes dq, dk, dv (any strides) in full.
// The neighbourhood axis is (m, d): md = m * P*P + d with the offset d = b * P + a (a: row, b: column).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

#ifdef __AVX512F__
constexpr int kBytes = 64;  // one vector: 16 float or 8 double lanes (one AVX-512 register)
#else
constexpr int kBytes = 32;  // one vector: 8 float or 4 double lanes (one AVX2 register)
#endif

template <typename T>
struct Vec {
  static constexpr int L = kBytes / sizeof(T);
  typedef T v __attribute__((vector_size(kBytes)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I i __attribute__((vector_size(kBytes)));        // comparison results of v
  typedef uint32_t u __attribute__((vector_size(L * 4)));  // one 32-bit hash per lane
  static v splat(T x) { return v{} + x; }
  static v load(const T* p) { v r; std::memcpy(&r, p, sizeof(v)); return r; }
  static void store(T* p, v x) { std::memcpy(p, &x, sizeof(v)); }
  static v max(v a, v b) { return a > b ? a : b; }
  static T sum(v a) { T s = 0; for (int k = 0; k < L; ++k) s += a[k]; return s; }
  // One bit per lane (lane k: bit k) of a comparison result, and back.
  static uint16_t bits(i m) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if constexpr (sizeof(T) == 4) return _mm512_movepi32_mask((__m512i)m);
    else return _mm512_movepi64_mask((__m512i)m);
#elif defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) return static_cast<uint16_t>(_mm256_movemask_ps((__m256)m));
    else return static_cast<uint16_t>(_mm256_movemask_pd((__m256d)m));
#else
    uint16_t b = 0;
    for (int k = 0; k < L; ++k) b |= static_cast<uint16_t>(m[k] != 0) << k;
    return b;
#endif
  }
  static i lane_bits() { i b; for (int k = 0; k < L; ++k) b[k] = I(1) << k; return b; }
  // w in the lanes whose bit is set in b, else 0
  static v where_bits(uint16_t b, v w) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) return (v)_mm512_maskz_mov_ps(static_cast<__mmask16>(b), (__m512)w);
    else return (v)_mm512_maskz_mov_pd(static_cast<__mmask8>(b), (__m512d)w);
#else
    return ((i{} + I(b)) & lane_bits()) != 0 ? w : splat(0);
#endif
  }
};

// exp of every lane (x clamped to [-87, 88]) (Cephes expf: Cody-Waite reduction + degree-6 polynomial,
// ~1 ulp); glibc's expf has no vector form without -ffast-math, which would also assume finite math.
inline Vec<float>::v vexp(Vec<float>::v x) {
  using V = Vec<float>;
  x = V::max(x, V::splat(-87.0f));
  x = x > 88.0f ? V::splat(88.0f) : x;
#if defined(__AVX512F__)  // AVX-512 rounds, and scales by 2^n, in one instruction each
  const V::v fx = (V::v)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  typedef int32_t vi __attribute__((vector_size(kBytes)));
  const V::v t = x * 1.44269504088896341f + 0.5f;
#if defined(__AVX2__)
  const V::v fx = (V::v)_mm256_round_ps((__m256)t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // floor(t)
  const vi fi = __builtin_convertvector(fx, vi);
#else
  vi fi = __builtin_convertvector(t, vi);  // floor(t): truncate, then one down where that rounded up
  fi += (__builtin_convertvector(fi, V::v) > t);
  const V::v fx = __builtin_convertvector(fi, V::v);
#endif
#endif
  const V::v r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const V::v z = r * r;
  V::v y = V::splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
#if defined(__AVX512F__)
  return (V::v)_mm512_scalef_ps((__m512)y, (__m512)fx);
#else
  return y * (V::v)((fi + 127) << 23);
#endif
}
inline Vec<double>::v vexp(Vec<double>::v x) {
  for (int k = 0; k < Vec<double>::L; ++k) x[k] = std::exp(std::min(x[k], 700.0));
  return x;
}

// log of every lane (x > 0; Cephes logf: exponent split + degree-8 polynomial, ~1 ulp).
inline Vec<float>::v vlog(Vec<float>::v x) {
  using V = Vec<float>;
  typedef int32_t vi __attribute__((vector_size(kBytes)));
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  V::v m = (V::v)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e += small;  // -1 where the mantissa is doubled below
  m = small ? m + m - 1.0f : m - 1.0f;
  const V::v z = m * m;
  V::v y = V::splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const V::v fe = __builtin_convertvector(e, V::v);
  y += fe * -2.12194440e-4f;
  y -= z * 0.5f;
  return m + y + fe * 0.693359375f;
}
inline Vec<double>::v vlog(Vec<double>::v x) {
  for (int k = 0; k < Vec<double>::L; ++k) x[k] = std::log(x[k]);
  return x;
}

// Dropout: a counter-based hash (lowbias32, C. Wellons) of (seed, pixel, element): the same masks in both passes.
template <typename U>
inline U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
inline uint32_t pixel_key(int64_t seed, int64_t pixel) {
  uint32_t s = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9U));
  return mix32(s + mix32(static_cast<uint32_t>(pixel) * 0x85ebca6bU + static_cast<uint32_t>(pixel >> 32)));
}

// One bit per lane (lane k: bit k): x >= t, for x < 2^16 and t <= 2^16 (so x > t - 1 signed: one instruction)
template <typename T>
inline uint16_t at_least(typename Vec<T>::u x, uint32_t t) {
  using V = Vec<T>;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (sizeof(T) == 4) return _mm512_cmpge_epu32_mask((__m512i)x, _mm512_set1_epi32(static_cast<int>(t)));
  else return _mm256_cmpge_epu32_mask((__m256i)x, _mm256_set1_epi32(static_cast<int>(t)));
#else
  typedef int32_t s32 __attribute__((vector_size(V::L * 4)));
  const s32 ge = (s32)x > static_cast<int32_t>(t) - 1;
  if constexpr (sizeof(T) == 4) return V::bits(ge);
  else return V::bits(__builtin_convertvector(ge, typename V::i));
#endif
}

// Subnormal inputs and results as zero while a task runs (x86 FTZ and DAZ): each operation on a subnormal costs
// about a hundred cycles, and the exponentials of far-away scores produce them; they are far below what the
// softmax resolves (rows whose sum underflows take the exact path).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Dims {
  int64_t N, H, W, Gq, Gk, Gv, D, Dv, P, P2, MD, Dpos, Dg, J, images, groups, runs, Wpad, R;
  bool has_group;
};
// lse output: log of the row sum relative to the row's shift (sum of the three maxima), or this marker for rows
// computed the exact way (the shift bound underflowed).
template <typename T>
constexpr T kExactRow = std::numeric_limits<T>::lowest();

// q, k, v, the output and their gradients: [B, H, W, G, C, heads] with any strides (views of one packed
// tensor); image n = b * heads + h. The contiguous [N, H, W, G, C] of one head is the case heads = 1.
template <typename T>
struct Strided {
  T* p;
  int64_t sb, si, sj, sg, sc, sh, heads;
  explicit Strided(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), si(t.stride(1)), sj(t.stride(2)), sg(t.stride(3)), sc(t.stride(4)),
        sh(t.stride(5)), heads(t.size(5)) {}
  T* at(int64_t n, int64_t i, int64_t j) const { return p + (n / heads) * sb + i * si + j * sj + (n % heads) * sh; }
};

// The row buffers: padded row `prow` (image row prow - r) of the images n0 .. n0+count-1 side by side (image t's
// column j at r + t * W + j), for the G x C planes (m, c) of keys or values, in slot prow % P of a ring of P rows:
// buf[((m * C + c) * P + slot) * Wpad + r + t * W + j], zero at both ends and in the padding rows, so that every load
// of a run stays inside (an offset that reaches into the neighbouring image is masked). Moving to the next image row
// copies one padded row. put_row is the adjoint: it writes a finished padded row of gradients (every inner element
// once per pass) and clears the slot.
template <typename T>
void get_row(const Dims& s, const Strided<T>& x, int64_t G, int64_t C, int64_t n0, int64_t count, int64_t prow,
             T* buf) {
  const int64_t r = s.P / 2, i = prow - r, ps = s.P * s.Wpad;
  T* row = buf + (prow % s.P) * s.Wpad + r;  // plane p's row at row + p * ps
  for (int64_t t = 0; t < count; ++t) {
    T* dst = row + t * s.W;
    if (i < 0 || i >= s.H) {
      for (int64_t p = 0; p < G * C; ++p) std::fill(dst + p * ps, dst + p * ps + s.W, T(0));
      continue;
    }
    const T* src = x.at(n0 + t, i, 0);
    if (x.sj == 1) {  // channels-first: each plane's image row is contiguous
      for (int64_t m = 0; m < G; ++m)
        for (int64_t c = 0; c < C; ++c) std::copy(src + m * x.sg + c * x.sc, src + m * x.sg + c * x.sc + s.W,
                                                  dst + (m * C + c) * ps);
      continue;
    }
    for (int64_t j = 0; j < s.W; ++j)
      for (int64_t m = 0; m < G; ++m)
        for (int64_t c = 0; c < C; ++c) dst[(m * C + c) * ps + j] = src[j * x.sj + m * x.sg + c * x.sc];
  }
  if (count < s.images)  // the last, partial group of images
    for (int64_t p = 0; p < G * C; ++p) std::fill(row + p * ps + count * s.W, row + p * ps + s.images * s.W, T(0));
}
template <typename T>
void put_row(const Dims& s, const Strided<T>& x, int64_t G, int64_t C, int64_t n0, int64_t count, int64_t prow,
             T* buf) {
  const int64_t r = s.P / 2, i = prow - r, ps = s.P * s.Wpad;
  T* row = buf + (prow % s.P) * s.Wpad;
  if (i >= 0 && i < s.H)
    for (int64_t t = 0; t < count; ++t) {
      T* dst = x.at(n0 + t, i, 0);
      const T* src = row + r + t * s.W;
      if (x.sj == 1) {  // channels-first
        for (int64_t m = 0; m < G; ++m)
          for (int64_t c = 0; c < C; ++c) std::copy(src + (m * C + c) * ps, src + (m * C + c) * ps + s.W,
                                                    dst + m * x.sg + c * x.sc);
        continue;
      }
      for (int64_t j = 0; j < s.W; ++j)
        for (int64_t m = 0; m < G; ++m)
          for (int64_t c = 0; c < C; ++c) dst[j * x.sj + m * x.sg + c * x.sc] = src[(m * C + c) * ps + j];
    }
  for (int64_t p = 0; p < G * C; ++p) std::fill(row + p * ps, row + p * ps + s.Wpad, T(0));
}

// The three channel contractions of the kernel, blocked so that a block of operands stays in registers. Per lane:
// A[x, c] (a vector per entry, row stride `as`), S[x, md] (rows of MD), and a row-buffer tensor B[c, md] at
// B + c * cs + off[md] (keys, values or their gradients; see rows()).
constexpr int kXB = 4, kCB = 5;  // block of x by c: 20 accumulators or operands (D = 10 in the presets)

// f(x0, xn, c0, cn) for the blocks of an X x C range (xn x cn: the block's size, at most XB x kCB)
template <int XB, typename F>
void for_blocks(int64_t X, int64_t C, F f) {
  for (int64_t x0 = 0; x0 < X; x0 += XB)
    for (int64_t c0 = 0; c0 < C; c0 += kCB) f(x0, std::min<int64_t>(XB, X - x0), c0, std::min<int64_t>(kCB, C - c0));
}

// f(x0, xn, c0, cn, a) for the kXB x kCB blocks of A, with a = the block at (x0, c0), zero outside
template <typename T, typename F>
void for_loaded_blocks(const typename Vec<T>::v* A, int64_t as, int64_t X, int64_t C, F f) {
  for_blocks<kXB>(X, C, [&](int64_t x0, int64_t xn, int64_t c0, int64_t cn) {
    typename Vec<T>::v a[kXB][kCB];
    for (int xx = 0; xx < kXB; ++xx)
      for (int cc = 0; cc < kCB; ++cc) a[xx][cc] = xx < xn && cc < cn ? A[(x0 + xx) * as + c0 + cc] : Vec<T>::splat(0);
    f(x0, xn, c0, cn, a);
  });
}

// out[x, md] = sum_c A[x, c] B[c, md]   (scores q . k, and go . value)
template <typename T>
void contract_c(const typename Vec<T>::v* A, int64_t as, int64_t X, int64_t C, const T* B, int64_t cs,
                const int64_t* off, int64_t MD, typename Vec<T>::v* out) {
  using V = Vec<T>;
  using v = typename V::v;
  for_loaded_blocks<T>(A, as, X, C, [&](int64_t x0, int64_t xn, int64_t c0, int64_t cn, const auto& a) {
    for (int64_t md = 0; md < MD; ++md) {
      const T* b = B + c0 * cs + off[md];
      v bb[kCB];
      for (int cc = 0; cc < kCB; ++cc) bb[cc] = cc < cn ? V::load(b + cc * cs) : V::splat(0);
      for (int xx = 0; xx < kXB; ++xx) {
        if (xx >= xn) break;
        v acc = c0 == 0 ? V::splat(0) : out[(x0 + xx) * MD + md];
        for (int cc = 0; cc < kCB; ++cc) acc += a[xx][cc] * bb[cc];
        out[(x0 + xx) * MD + md] = acc;
      }
    }
  });
}

// out[x, c] = sum_md S[x, md] B[c, md]   (output p . value, and the query gradient dC . k)
template <typename T>
void contract_md(const typename Vec<T>::v* S, int64_t X, int64_t C, const T* B, int64_t cs, const int64_t* off,
                 int64_t MD, typename Vec<T>::v* out, int64_t os) {
  using V = Vec<T>;
  using v = typename V::v;
  constexpr int XB = 2;
  for_blocks<XB>(X, C, [&](int64_t x0, int64_t xn, int64_t c0, int64_t cn) {
    v acc[XB][kCB] = {};
    for (int64_t md = 0; md < MD; ++md) {
      const T* b = B + c0 * cs + off[md];
      v ss[XB];
      for (int xx = 0; xx < XB; ++xx) ss[xx] = xx < xn ? S[(x0 + xx) * MD + md] : V::splat(0);
      for (int cc = 0; cc < kCB; ++cc) {
        if (cc >= cn) break;
        const v bc = V::load(b + cc * cs);
        for (int xx = 0; xx < XB; ++xx) acc[xx][cc] += ss[xx] * bc;
      }
    }
    for (int xx = 0; xx < xn; ++xx)
      for (int cc = 0; cc < cn; ++cc) out[(x0 + xx) * os + c0 + cc] = acc[xx][cc];
  });
}

// B[c, md] += sum_x A[x, c] S[x, md]   (the key and value gradients)
template <typename T>
void accumulate_outer(const typename Vec<T>::v* A, int64_t as, int64_t X, int64_t C, const typename Vec<T>::v* S,
                      int64_t MD, T* B, int64_t cs, const int64_t* off) {
  using V = Vec<T>;
  using v = typename V::v;
  for_loaded_blocks<T>(A, as, X, C, [&](int64_t x0, int64_t xn, int64_t c0, int64_t cn, const auto& a) {
    for (int64_t md = 0; md < MD; ++md) {
      v ss[kXB];
      for (int xx = 0; xx < kXB; ++xx) ss[xx] = xx < xn ? S[(x0 + xx) * MD + md] : V::splat(0);
      T* b = B + c0 * cs + off[md];
      for (int cc = 0; cc < kCB; ++cc) {
        if (cc >= cn) break;
        v acc = V::load(b + cc * cs);
        for (int xx = 0; xx < kXB; ++xx) acc += a[xx][cc] * ss[xx];
        V::store(b + cc * cs, acc);
      }
    }
  });
}

// off[md] for md = (m, b, a) of a row-buffer tensor with C channels at image row i: key or value (m, c) of offset
// (a, b) of the run's first pixel is at buf + c * P * Wpad + off[md] (padded row i + a in its ring slot)
inline void md_offsets(int64_t G, int64_t C, int64_t P, int64_t Wpad, int64_t i, int64_t* off) {
  for (int64_t m = 0; m < G; ++m)
    for (int64_t b = 0; b < P; ++b)
      for (int64_t a = 0; a < P; ++a) off[m * P * P + b * P + a] = (m * C * P + (i + a) % P) * Wpad + b;
}

// Per-thread scratch for one run of L pixels: positions j0 .. j0+L-1 of the concatenated row i of images n0 ..
// n0+count-1 (see rows()); the score terms, computed identically in both passes, one vector (a lane per pixel) per
// entry.
template <typename T>
struct Run {
  using V = Vec<T>;
  using v = typename V::v;
  static constexpr int L = V::L;
  const Dims& s;
  std::vector<T> ks, vs;  // the run's image rows of keys and values (see rows())
  std::vector<v> q, mask, C, eC, S0, eS0, eS, A, eA, qg, row;
  std::vector<int64_t> koff, voff;  // md_offsets of the key and value rows
  int64_t cs;  // channel stride of the row buffers
  v valid;  // 1 for lanes on a pixel
  int64_t n0 = 0, count = 0, i = 0, j0 = 0;
  bool started = false;
  int64_t pix[L], img[L], col[L];  // the lanes' pixels (flat index into [N, H, W]), images and columns; lanes
                                    // outside the images repeat the last one
  int nlanes = 0;

  explicit Run(const Dims& d)
      : s(d), ks(d.Gk * d.D * d.P * d.Wpad), vs(d.Gk * d.Dv * d.P * d.Wpad), q(d.Gq * d.D), mask(d.P2),
        C(d.Gq * d.MD), eC(d.Gq * d.MD), S0(d.Gq * d.R), eS0(d.Gq * d.R), eS(d.Gv * d.Gq * d.P2),
        A(d.Gv * d.Gq * d.Gk), eA(d.Gv * d.Gq * d.Gk),
        qg(d.Gq * std::max<int64_t>(d.J, 1)), row(d.MD), koff(d.MD), voff(d.MD), cs(d.P * d.Wpad) {}

  int64_t pixel(int k) const { return pix[k]; }
  // Whether all L lanes are pixels of one image, which are then contiguous in x's planes (x channels-first)
  bool whole(const Strided<T>& x) const { return x.sj == 1 && nlanes == L && img[0] == img[L - 1]; }

  // The run's entries of x (its [G, C] planes at image row i) as dst[g * C + c], a lane per pixel, times scale (zero
  // in lanes outside the images); scatter() writes them back. One vector per plane when the run is whole.
  void gather(const Strided<T>& x, int64_t G, int64_t C, T scale, v* dst) const {
    if (whole(x)) {
      const T* src = x.at(img[0], i, col[0]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) dst[g * C + c] = V::load(src + g * x.sg + c * x.sc) * scale;
      return;
    }
    std::fill(dst, dst + G * C, V::splat(0));
    for (int k = 0; k < nlanes; ++k) {
      const T* src = x.at(img[k], i, col[k]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) dst[g * C + c][k] = src[g * x.sg + c * x.sc] * scale;
    }
  }
  void scatter(const Strided<T>& x, int64_t G, int64_t C, const v* src) const {
    if (whole(x)) {
      T* dst = x.at(img[0], i, col[0]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) V::store(dst + g * x.sg + c * x.sc, src[g * C + c]);
      return;
    }
    for (int k = 0; k < nlanes; ++k) {
      T* dst = x.at(img[k], i, col[k]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) dst[g * x.sg + c * x.sc] = src[g * C + c][k];
    }
  }

  int lanes() const { return nlanes; }

  // Image row i_ of image group `group`: the ring gets the padded rows i_ .. i_+P-1 (one new row after row i_-1).
  void start_row(const Strided<T>& kx, const Strided<T>& vx, int64_t group, int64_t i_) {
    const bool next = group * s.images == n0 && i_ == i + 1 && started;
    n0 = group * s.images;
    count = std::min(s.images, s.N - n0);
    i = i_;
    started = true;
    for (int64_t prow = next ? i + s.P - 1 : i; prow < i + s.P; ++prow) {
      get_row<T>(s, kx, s.Gk, s.D, n0, count, prow, ks.data());
      get_row<T>(s, vx, s.Gk, s.Dv, n0, count, prow, vs.data());
    }
    md_offsets(s.Gk, s.D, s.P, s.Wpad, i, koff.data());
    md_offsets(s.Gk, s.Dv, s.P, s.Wpad, i, voff.data());
  }

  // The run's queries (times scale; zero in lanes outside the image) and the validity masks of its offsets.
  void start_run(int64_t j0_, const Strided<T>& qx, T scale) {
    j0 = j0_;
    const int64_t r = s.P / 2;
    nlanes = static_cast<int>(std::min<int64_t>(L, count * s.W - j0));
    int64_t lane_col[L];  // (j0 + k) % W, counted up (no division per lane)
    int64_t im = n0 + j0 / s.W, cl = j0 % s.W;
    for (int k = 0; k < L; ++k) {
      lane_col[k] = cl;
      if (k < nlanes) {
        img[k] = im;
        col[k] = cl;
        pix[k] = (im * s.H + i) * s.W + cl;
      } else {  // lanes outside the images repeat the last one
        img[k] = img[k - 1];
        col[k] = col[k - 1];
        pix[k] = pix[k - 1];
      }
      if (++cl == s.W) {
        cl = 0;
        ++im;
      }
    }
    for (int k = 0; k < L; ++k) valid[k] = k < nlanes ? T(1) : T(0);
    gather(qx, s.Gq, s.D, scale, q.data());
    for (int64_t b = 0; b < s.P; ++b) {
      v inside;
      for (int k = 0; k < L; ++k) {
        const int64_t j = lane_col[k] + b - r;  // the lane's own column: the neighbouring image is outside
        inside[k] = j >= 0 && j < s.W ? T(1) : T(0);
      }
      for (int64_t a = 0; a < s.P; ++a) mask[b * s.P + a] = i + a - r >= 0 && i + a - r < s.H ? inside : V::splat(0);
    }
  }

  // Content, spatial and group terms (times scale), their maxima over the neighbourhood and shifted exponentials.
  void scores(const T* U, const int64_t* idx, const T* grp, const int64_t* gidx) {
    const int64_t P2 = s.P2, MD = s.MD, Gq = s.Gq, Gk = s.Gk, Gv = s.Gv;
    const v lowest = V::splat(std::numeric_limits<T>::lowest());
    contract_c<T>(q.data(), s.D, Gq, s.D, ks.data() + j0, cs, koff.data(), MD, C.data());
    for (int64_t g = 0; g < Gq; ++g) {
      v mx = lowest;
      for (int64_t m = 0; m < Gk; ++m)
        for (int64_t d = 0; d < P2; ++d) mx = V::max(mx, mask[d] > T(0) ? C[g * MD + m * P2 + d] : lowest);
      mx = mx == lowest ? V::splat(0) : mx;  // lanes outside the image see no key
      for (int64_t m = 0; m < Gk; ++m)
        for (int64_t d = 0; d < P2; ++d) eC[g * MD + m * P2 + d] = vexp(C[g * MD + m * P2 + d] - mx) * mask[d];
      // spatial: the distinct rows of the table (for GE-ViT's p4 and p4m tables, the first v's), shifted by their
      // maximum (over every offset: a valid bound for every v), then moved to each v's offsets
      v sm = lowest;
      for (int64_t r = 0; r < s.R; ++r) {
        v acc = q[g * s.D] * U[r];
        for (int64_t c = 1; c < s.Dpos; ++c) acc += q[g * s.D + c] * U[c * s.R + r];
        S0[g * s.R + r] = acc;
        sm = V::max(sm, acc);
      }
      for (int64_t r = 0; r < s.R; ++r) eS0[g * s.R + r] = vexp(S0[g * s.R + r] - sm);
      for (int64_t vv = 0; vv < Gv; ++vv)
        for (int64_t d = 0; d < P2; ++d) eS[(vv * Gq + g) * P2 + d] = eS0[g * s.R + idx[vv * P2 + d]];
      for (int64_t jx = 0; jx < s.J; ++jx) {
        v acc = V::splat(0);
        for (int64_t c = 0; c < s.Dg; ++c) acc += q[g * s.D + s.Dpos + c] * grp[jx * s.Dg + c];
        qg[g * s.J + jx] = acc;
      }
    }
    for (int64_t vg = 0; vg < Gv * Gq; ++vg) {
      const int64_t g = vg % Gq;
      v am = s.has_group ? lowest : V::splat(0);
      for (int64_t m = 0; m < Gk; ++m) {
        A[vg * Gk + m] = s.has_group ? qg[g * s.J + gidx[vg * Gk + m]] : V::splat(0);
        am = V::max(am, A[vg * Gk + m]);
      }
      for (int64_t m = 0; m < Gk; ++m) eA[vg * Gk + m] = vexp(A[vg * Gk + m] - am);
    }
  }

  // z = sum over (m, d) of exp(L[v,g,m,d] - shift) (shift = the sum of the three terms' maxima), the product of the three factors
  v row_sum(int64_t vv, int64_t g) const {
    const int64_t P2 = s.P2, vg = vv * s.Gq + g;
    const v* eCg = eC.data() + g * s.MD;
    const v* eSvg = eS.data() + vg * P2;
    v z = V::splat(0);
    for (int64_t m = 0; m < s.Gk; ++m) {
      const v* c = eCg + m * P2;
      v z0 = V::splat(0), z1 = z0, z2 = z0, z3 = z0;  // four partial sums in registers: no chained additions
      int64_t d = 0;
      for (; d + 4 <= P2; d += 4) {
        z0 += c[d] * eSvg[d];
        z1 += c[d + 1] * eSvg[d + 1];
        z2 += c[d + 2] * eSvg[d + 2];
        z3 += c[d + 3] * eSvg[d + 3];
      }
      for (; d < P2; ++d) z0 += c[d] * eSvg[d];
      z += eA[vg * s.Gk + m] * ((z0 + z1) + (z2 + z3));
    }
    return z;
  }

  // row[md] = exp(L[v,g,md] - shift) * f
  void factored_row(int64_t vv, int64_t g, v f) {
    const int64_t P2 = s.P2, vg = vv * s.Gq + g;
    const v* eCg = eC.data() + g * s.MD;
    const v* eSvg = eS.data() + vg * P2;
    for (int64_t m = 0; m < s.Gk; ++m) {
      const v a = eA[vg * s.Gk + m] * f;
      for (int64_t d = 0; d < P2; ++d) row[m * P2 + d] = eCg[m * P2 + d] * eSvg[d] * a;
    }
  }

  // wv[md] += exp(L[v,g,md] - shift) * w where dropout keeps the score (bit set in keep[md]; Drop false: all)
  template <bool Drop>
  void accumulate(int64_t vv, int64_t g, v w, const uint16_t* keep, v* wv) const {
    const int64_t P2 = s.P2, vg = vv * s.Gq + g;
    const v* eCg = eC.data() + g * s.MD;
    const v* eSvg = eS.data() + vg * P2;
    for (int64_t m = 0; m < s.Gk; ++m) {
      const v a = eA[vg * s.Gk + m] * w;
      for (int64_t d = 0; d < P2; ++d) {
        const v x = eCg[m * P2 + d] * eSvg[d] * a;
        wv[m * P2 + d] += Drop ? V::where_bits(keep[m * P2 + d], x) : x;
      }
    }
  }

  // The lanes `lanes_exact` of row[md] as exp(L[v,g,md] - max) / z computed directly (max: the exact row maximum).
  void exact_row(int64_t vv, int64_t g, typename V::i lanes_exact, const int64_t* idx) {
    const int64_t P2 = s.P2, vg = vv * s.Gq + g;
    const v lowest = V::splat(std::numeric_limits<T>::lowest());
    std::vector<v> x(s.MD);
    v mx = lowest;
    for (int64_t m = 0; m < s.Gk; ++m)
      for (int64_t d = 0; d < P2; ++d) {
        x[m * P2 + d] = C[g * s.MD + m * P2 + d] + S0[g * s.R + idx[vv * P2 + d]] + A[vg * s.Gk + m];
        mx = V::max(mx, mask[d] > T(0) ? x[m * P2 + d] : lowest);
      }
    v z = V::splat(0);
    for (int64_t md = 0; md < s.MD; ++md) {
      x[md] = vexp(x[md] - mx) * mask[md % P2];
      z += x[md];
    }
    z = z > T(0) ? z : V::splat(1);
    for (int64_t md = 0; md < s.MD; ++md) row[md] = lanes_exact ? x[md] / z : row[md];
  }

  // keep[md]: the lanes where dropout keeps score (v, g, md) (bit k: lane k): 16 random bits per score at least
  // the threshold, the two halves of hash (seed, pixel, v, g, t) for md = t and md = t + ceil(MD / 2). The backward
  // pass reads them instead of hashing again.
  void draw(int64_t vv, int64_t g, typename V::u key, uint32_t threshold, uint16_t* keep) const {
    const int64_t half = (s.MD + 1) / 2;
    typename V::u counter = key + static_cast<uint32_t>((vv * s.Gq + g) * half);  // + t
    for (int64_t t = 0; t < half; ++t, counter += 1U) {
      const typename V::u h = mix32(counter);
      keep[t] = at_least<T>(h & 0xffffU, threshold);
      if (t + half < s.MD) keep[t + half] = at_least<T>(h >> 16, threshold);
    }
  }

  typename V::u keys(int64_t seed) const {
    typename V::u k{};
    for (int l = 0; l < L; ++l) k[l] = pixel_key(seed, pixel(l));
    return k;
  }
};

template <typename V>
bool any(typename V::i x) {
  return V::bits(x) != 0;
}

Dims make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
               const at::Tensor& grp, int64_t patch, int64_t lanes, int64_t rows) {
  TORCH_CHECK(q.dim() == 6 && k.dim() == 6 && v.dim() == 6, "q, k, v must be [B, H, W, G, C, heads]");
  Dims s;
  s.N = q.size(0) * q.size(5); s.H = q.size(1); s.W = q.size(2); s.Gq = q.size(3); s.D = q.size(4);
  s.Gk = k.size(3); s.Dv = v.size(4); s.Gv = pos.size(0); s.P = patch; s.P2 = patch * patch;
  s.MD = s.Gk * s.P2; s.Dpos = pos.size(2); s.R = rows;
  // Images side by side in a run's row: the fewest that fill at least 15/16 of the lanes (at most enough for a
  // whole number of runs): small images fill the lanes, and a 28-wide row is not two runs with 4 idle lanes.
  const int64_t most = lanes / std::gcd(s.W, lanes);
  s.images = 1;
  while (s.images < most && 16 * s.images * s.W < 15 * lanes * ((s.images * s.W + lanes - 1) / lanes)) ++s.images;
  s.groups = (s.N + s.images - 1) / s.images;
  s.runs = (s.images * s.W + lanes - 1) / lanes;
  s.Wpad = s.runs * lanes + 2 * (patch / 2);
  s.has_group = grp.numel() > 0;
  s.J = s.has_group ? grp.size(0) : 0;
  s.Dg = s.has_group ? grp.size(1) : 0;
  TORCH_CHECK(pos.size(1) == s.P2, "positional table has ", pos.size(1), " offsets, patch ", patch, " needs ", s.P2);
  TORCH_CHECK(s.Dpos + s.Dg <= s.D, "positional + group channels exceed the query channels");
  TORCH_CHECK(s.Dpos >= 1 && s.D >= 1 && s.Dv >= 1, "empty channel axis");
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->size(0) == q.size(0) && t->size(1) == s.H && t->size(2) == s.W && t->size(5) == q.size(5),
                "q, k, v must share B, H, W and heads");
  TORCH_CHECK(k.size(4) == s.D && v.size(3) == s.Gk, "keys must be [B, H, W, Gk, D, heads], values [B, H, W, Gk, Dv, heads]");
  TORCH_CHECK(pos.is_contiguous(), "the positional table must be contiguous");
  return s;
}

// The distinct rows of the positional table pos [Gv, P2 (a * P + b), Dpos] (equal bit for bit): U [Dpos, R] and, for
// every v and offset d = b * P + a (the kernel's order), idx[v * P2 + d] with pos[v, a * P + b] = U[:, idx]. GE-ViT's
// p4 and p4m tables are the first v's moved (R = P2): the spatial scores and their exponentials are computed once.
struct PosRows {
  at::Tensor U;
  std::vector<int64_t> idx;
};

PosRows distinct_rows(const at::Tensor& pos, int64_t P) {
  TORCH_CHECK(pos.dim() == 3 && pos.is_contiguous(), "the positional table must be a contiguous [Gv, P*P, Dpos]");
  TORCH_CHECK(pos.size(1) == P * P, "positional table has ", pos.size(1), " offsets, patch ", P, " needs ", P * P);
  const int64_t Gv = pos.size(0), P2 = pos.size(1), n = Gv * P2;
  const size_t bytes = pos.size(2) * pos.element_size();
  const char* base = static_cast<const char*>(pos.data_ptr());
  auto row = [&](int64_t r) { return base + r * bytes; };
  std::vector<int64_t> order(n), first, id(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return std::memcmp(row(x), row(y), bytes) < 0; });
  for (const int64_t r : order) {
    if (first.empty() || std::memcmp(row(first.back()), row(r), bytes) != 0) first.push_back(r);
    id[r] = static_cast<int64_t>(first.size()) - 1;
  }
  PosRows out;
  out.U = pos.reshape({n, pos.size(2)}).index_select(0, at::tensor(first)).t().contiguous();
  out.idx.resize(n);
  for (int64_t v = 0; v < Gv; ++v)
    for (int64_t a = 0; a < P; ++a)
      for (int64_t b = 0; b < P; ++b) out.idx[v * P2 + b * P + a] = id[v * P2 + a * P + b];
  return out;
}

uint32_t drop_threshold(double p) { return static_cast<uint32_t>(std::min(65536.0, std::ceil(p * 65536.0))); }

// 1 / keep probability (0 when everything is dropped); the keep probability is exactly P(16 random bits >= threshold).
double keep_scale_of(double p) {
  const double keep = (65536.0 - drop_threshold(p)) / 65536.0;
  return keep > 0 ? 1.0 / keep : 0.0;
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& qt, const at::Tensor& kt, const at::Tensor& vt, const at::Tensor& pos,
                                const at::Tensor& grp, const at::Tensor& gidx, double scale, int64_t patch,
                                double dropout, int64_t seed) {
  // out [B, H, W, Gv, Dv, heads], in q's memory order: channels-last, or channels-first ([B, Dv, heads, Gv, H, W])
  const bool channels_first = qt.stride(2) < qt.stride(3);
  auto out = channels_first
      ? at::empty({qt.size(0), vt.size(4), qt.size(5), pos.size(0), qt.size(1), qt.size(2)}, qt.options())
            .permute({0, 4, 5, 3, 1, 2})
      : at::empty({qt.size(0), qt.size(1), qt.size(2), pos.size(0), vt.size(4), qt.size(5)}, qt.options());
  auto lse = at::empty({qt.size(0) * qt.size(5), qt.size(1), qt.size(2), pos.size(0), qt.size(3)}, qt.options());
  at::Tensor keep;  // dropout's kept lanes, a bit per lane: [image group, row, run, v, g, md]
  const PosRows rows = distinct_rows(pos, patch);
  const uint32_t threshold = dropout > 0 ? drop_threshold(dropout) : 0;
  AT_DISPATCH_FLOATING_TYPES(qt.scalar_type(), "gevit_local_attention_forward", [&] {
    using T = scalar_t;
    using V = Vec<T>;
    using v = typename V::v;
    const Dims s = make_dims(qt, kt, vt, pos, grp, patch, V::L, rows.U.size(1));
    const Strided<T> qx(qt), kx(kt), vx(vt), ox(out);
    const T* ud = rows.U.data_ptr<T>();
    const int64_t* id = rows.idx.data();
    const T* gd = s.has_group ? grp.data_ptr<T>() : nullptr;
    const int64_t* xd = s.has_group ? gidx.data_ptr<int64_t>() : nullptr;
    T* ld = lse.data_ptr<T>();
    keep = at::empty({dropout > 0 ? s.groups * s.H * s.runs * s.Gv * s.Gq * s.MD : 0}, qt.options().dtype(at::kShort));
    uint16_t* kd_bits = reinterpret_cast<uint16_t*>(keep.data_ptr<int16_t>());
    const T tiny = std::numeric_limits<T>::min() * T(1e8);
    const T keep_scale = dropout > 0 ? T(keep_scale_of(dropout)) : T(1);
    const int64_t MD = s.MD;
    at::parallel_for(0, s.groups * s.H, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      Run<T> run(s);
      std::vector<v> wsum(s.Gv * MD), o(s.Gv * s.Dv);
      for (int64_t ni = begin; ni < end; ++ni) {
        run.start_row(kx, vx, ni / s.H, ni % s.H);
        for (int64_t jr = 0; jr * V::L < run.count * s.W; ++jr) {
          run.start_run(jr * V::L, qx, T(scale));
          run.scores(ud, id, gd, xd);
          const typename V::u key = dropout > 0 ? run.keys(seed) : typename V::u{};
          const int lanes = run.lanes();
          std::fill(wsum.begin(), wsum.end(), V::splat(0));
          for (int64_t vv = 0; vv < s.Gv; ++vv) {
            v* wv = wsum.data() + vv * MD;
            for (int64_t g = 0; g < s.Gq; ++g) {
              v z = run.row_sum(vv, g);
              uint16_t* kb = dropout > 0 ? kd_bits + (((ni * s.runs + jr) * s.Gv + vv) * s.Gq + g) * MD : nullptr;
              if (kb) run.draw(vv, g, key, threshold, kb);
              const typename V::i exact = (z < tiny) & (run.valid > T(0));
              const bool any_exact = any<V>(exact);
              if (any_exact) {  // the shift bound was too loose: exact maximum (the backward pass redoes this)
                run.factored_row(vv, g, V::splat(1));
                run.exact_row(vv, g, exact, id);
                z = exact ? V::splat(1) : z;
              }
              const v log_z = exact ? V::splat(kExactRow<T>) : vlog(z);
              for (int k = 0; k < lanes; ++k) ld[(run.pixel(k) * s.Gv + vv) * s.Gq + g] = log_z[k];
              const v w = run.valid > T(0) ? keep_scale / z : V::splat(0);
              if (any_exact)
                for (int64_t md = 0; md < MD; ++md) wv[md] += kb ? V::where_bits(kb[md], run.row[md] * w) : run.row[md] * w;
              else if (kb)
                run.template accumulate<true>(vv, g, w, kb, wv);
              else
                run.template accumulate<false>(vv, g, w, nullptr, wv);
            }
          }
          // out[v, c] = sum_md wsum[v, md] value[c, md]
          contract_md<T>(wsum.data(), s.Gv, s.Dv, run.vs.data() + run.j0, run.cs, run.voff.data(), MD, o.data(), s.Dv);
          run.scatter(ox, s.Gv, s.Dv, o.data());
        }
      }
    });
  });
  return {out, lse, keep};
}

// dq, dk, dv: written in full (any strides, e.g. views of one packed gradient); returns dpos, dgrp.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& qt, const at::Tensor& kt,
                                 const at::Tensor& vt, const at::Tensor& pos, const at::Tensor& grp,
                                 const at::Tensor& gidx, const at::Tensor& lse, const at::Tensor& keep, double scale,
                                 int64_t patch, double dropout, at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  const PosRows rows = distinct_rows(pos, patch);
  const int64_t threads = at::get_num_threads();
  const int64_t J = std::max<int64_t>(grp.numel() > 0 ? grp.size(0) : 0, 1);
  const int64_t Dg = std::max<int64_t>(grp.numel() > 0 ? grp.size(1) : 0, 1);
  auto dposT_parts = at::zeros({threads, pos.size(0), pos.size(2), patch * patch}, qt.options());
  auto dgrp_parts = at::zeros({threads, J, Dg}, qt.options());
  AT_DISPATCH_FLOATING_TYPES(qt.scalar_type(), "gevit_local_attention_backward", [&] {
    using T = scalar_t;
    using V = Vec<T>;
    using v = typename V::v;
    const Dims s = make_dims(qt, kt, vt, pos, grp, patch, V::L, rows.U.size(1));
    TORCH_CHECK(dq.sizes() == qt.sizes() && dk.sizes() == kt.sizes() && dv.sizes() == vt.sizes(),
                "dq, dk, dv must have the shapes of q, k, v");
    TORCH_CHECK(grad_out.dim() == 6 && grad_out.size(3) == s.Gv && grad_out.size(4) == s.Dv,
                "grad_out must be [B, H, W, Gv, Dv, heads]");
    const Strided<T> qx(qt), kx(kt), vx(vt), gox(grad_out), dqx(dq), dkx(dk), dvx(dv);
    const T* ud = rows.U.data_ptr<T>();
    const int64_t* id = rows.idx.data();
    const T* gd = s.has_group ? grp.data_ptr<T>() : nullptr;
    const int64_t* xd = s.has_group ? gidx.data_ptr<int64_t>() : nullptr;
    const T* ld = lse.data_ptr<T>();
    TORCH_CHECK(dropout <= 0 || keep.numel() == s.groups * s.H * s.runs * s.Gv * s.Gq * s.MD,
                "the dropout bits do not match this call (", keep.numel(), " entries)");
    const uint16_t* kd_bits = dropout > 0 ? reinterpret_cast<const uint16_t*>(keep.data_ptr<int16_t>()) : nullptr;
    const T keep_scale = dropout > 0 ? T(keep_scale_of(dropout)) : T(1);
    const T sc = T(scale);
    const v keep_sv = V::splat(keep_scale);
    const int64_t MD = s.MD, P = s.P, P2 = s.P2, Gq = s.Gq, Gv = s.Gv, Gk = s.Gk;
    // Whole image groups per task: the scatters into dk, dv of one image never cross tasks.
    at::parallel_for(0, s.groups, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      const int64_t tid = at::get_thread_num();
      T* dposT = dposT_parts.data_ptr<T>() + tid * Gv * s.Dpos * P2;
      T* dgrp = dgrp_parts.data_ptr<T>() + tid * J * Dg;
      Run<T> run(s);
      std::vector<v> go(Gv * s.Dv), dP(Gv * MD), wsum(Gv * MD), dC(Gq * MD), dS(Gv * Gq * P2), dA(Gv * Gq * Gk),
          dq_run(Gq * s.D), dS0(Gq * s.R), kept_row(MD), dpos_acc(Gv * s.Dpos * P2, V::splat(0)), dgrp_acc(J * Dg, V::splat(0)), dqg(Gq * J);
      std::vector<T> dks(run.ks.size()), dvs(run.vs.size());  // gradients of the run rows
      for (int64_t n = begin; n < end; ++n) {  // n: the group
        for (int64_t i = 0; i < s.H; ++i) {
          run.start_row(kx, vx, n, i);
          for (int64_t jr = 0; jr * V::L < run.count * s.W; ++jr) {
            run.start_run(jr * V::L, qx, sc);
            run.scores(ud, id, gd, xd);
            const int lanes = run.lanes();
            run.gather(gox, Gv, s.Dv, T(1), go.data());
            // dP[v, md] = go[v] . value[md]
            contract_c<T>(go.data(), s.Dv, Gv, s.Dv, run.vs.data() + run.j0, run.cs, run.voff.data(), MD, dP.data());
            std::fill(wsum.begin(), wsum.end(), V::splat(0));
            std::fill(dC.begin(), dC.end(), V::splat(0));
            std::fill(dS.begin(), dS.end(), V::splat(0));
            for (int64_t vv = 0; vv < Gv; ++vv) {
              const v* dPv = dP.data() + vv * MD;
              v* wv = wsum.data() + vv * MD;
              for (int64_t g = 0; g < Gq; ++g) {
                const int64_t vg = vv * Gq + g;
                v log_z = V::splat(0);
                for (int k = 0; k < lanes; ++k) log_z[k] = ld[run.pixel(k) * Gv * Gq + vg];
                const typename V::i exact = log_z == kExactRow<T>;
                // relative to the shift: no cancellation between large logits and their normaliser
                run.factored_row(vv, g, vexp(exact ? V::splat(0) : -log_z));
                if (any<V>(exact)) run.exact_row(vv, g, exact, id);  // the forward pass took the exact path here
                const v* prob = run.row.data();
                v* kr = kept_row.data();  // the kept probabilities: p * keep / (1 - dropout) (dropout's bits), or p
                const uint16_t* bits = dropout > 0 ? kd_bits + (((n * s.H + i) * s.runs + jr) * Gv * Gq + vg) * MD : nullptr;
                auto kept = [&](int64_t md) {  // k * dP, after kr[md] = k and wsum[v, md] += k
                  const v k = bits ? V::where_bits(bits[md], prob[md] * keep_sv) : prob[md];
                  kr[md] = k;
                  wv[md] += k;
                  return k * dPv[md];
                };
                v r0 = V::splat(0), r1 = r0, r2 = r0, r3 = r0;  // four partial sums in registers
                int64_t md = 0;
                for (; md + 4 <= MD; md += 4) {
                  r0 += kept(md);
                  r1 += kept(md + 1);
                  r2 += kept(md + 2);
                  r3 += kept(md + 3);
                }
                for (; md < MD; ++md) r0 += kept(md);
                const v rs = (r0 + r1) + (r2 + r3);
                for (int64_t m = 0; m < Gk; ++m) {
                  v acc = V::splat(0);
                  for (int64_t d = 0; d < P2; ++d) {
                    const int64_t md = m * P2 + d;
                    const v dd = kr[md] * dPv[md] - prob[md] * rs;  // softmax backward
                    dC[g * MD + md] += dd;
                    dS[vg * P2 + d] += dd;
                    acc += dd;
                  }
                  dA[vg * Gk + m] = acc;
                }
              }
            }
            // Content: dq[g] += sc * dC[g] . K; dK += sc * q[g] dC[g]; values: dV[md] += sum_v wsum[v, md] go[v]
            contract_md<T>(dC.data(), Gq, s.D, run.ks.data() + run.j0, run.cs, run.koff.data(), MD, dq_run.data(), s.D);
            // q is already times sc
            accumulate_outer<T>(run.q.data(), s.D, Gq, s.D, dC.data(), MD, dks.data() + run.j0, run.cs, run.koff.data());
            accumulate_outer<T>(go.data(), s.Dv, Gv, s.Dv, wsum.data(), MD, dvs.data() + run.j0, run.cs, run.voff.data());
            for (auto& x : dq_run) x *= sc;
            // Spatial: dq[g, :Dpos] += sc * sum_r dS0[g, r] U[:, r] (dS0[g, r]: dS[v, g, d] summed over idx[v, d] = r);
            // dposT[v, c, d] += sum_g sc * q[g, c] dS[v, g, d]
            std::fill(dS0.begin(), dS0.end(), V::splat(0));
            for (int64_t vv = 0; vv < Gv; ++vv)
              for (int64_t g = 0; g < Gq; ++g)
                for (int64_t d = 0; d < P2; ++d) dS0[g * s.R + id[vv * P2 + d]] += dS[(vv * Gq + g) * P2 + d];
            for (int64_t g = 0; g < Gq; ++g)
              for (int64_t c = 0; c < s.Dpos; ++c) {
                v acc = V::splat(0);
                for (int64_t r = 0; r < s.R; ++r) acc += dS0[g * s.R + r] * ud[c * s.R + r];
                dq_run[g * s.D + c] += sc * acc;
              }
            for (int64_t vv = 0; vv < Gv; ++vv)
              for (int64_t c = 0; c < s.Dpos; ++c) {
                v* dpc = dpos_acc.data() + (vv * s.Dpos + c) * P2;
                for (int64_t d = 0; d < P2; ++d) {
                  v acc = dpc[d];
                  for (int64_t g = 0; g < Gq; ++g) acc += run.q[g * s.D + c] * dS[(vv * Gq + g) * P2 + d];
                  dpc[d] = acc;
                }
              }
            // Group: dqg[g, j] = sc * sum of dA over (v, m) with gidx[v,g,m] = j
            if (s.has_group) {
              std::fill(dqg.begin(), dqg.end(), V::splat(0));
              for (int64_t vg = 0; vg < Gv * Gq; ++vg) {
                const int64_t g = vg % Gq;
                for (int64_t m = 0; m < Gk; ++m) dqg[g * J + xd[vg * Gk + m]] += sc * dA[vg * Gk + m];
              }
              for (int64_t g = 0; g < Gq; ++g)
                for (int64_t jx = 0; jx < s.J; ++jx) {
                  const v a = dqg[g * J + jx];
                  for (int64_t c = 0; c < s.Dg; ++c) {
                    dq_run[g * s.D + s.Dpos + c] += a * gd[jx * s.Dg + c];
                    dgrp_acc[jx * Dg + c] += a * run.q[g * s.D + s.Dpos + c];  // q times sc: divided out below
                  }
                }
            }
            run.scatter(dqx, Gq, s.D, dq_run.data());
          }
          // into the padded planar dk, dv: padded row i is complete (the last row: all rows of the ring)
          for (int64_t prow = i; prow < (i + 1 < s.H ? i + 1 : i + P); ++prow) {
            put_row<T>(s, dkx, Gk, s.D, run.n0, run.count, prow, dks.data());
            put_row<T>(s, dvx, Gk, s.Dv, run.n0, run.count, prow, dvs.data());
          }
        }
      }
      // q in the run is times sc: the positional and group gradients were accumulated with sc * q
      for (int64_t x = 0; x < Gv * s.Dpos * P2; ++x) dposT[x] += V::sum(dpos_acc[x]);
      for (int64_t x = 0; x < J * Dg; ++x) dgrp[x] += sc != T(0) ? V::sum(dgrp_acc[x]) / sc : T(0);
    });
  });
  auto dpos = dposT_parts.sum(0).view({pos.size(0), pos.size(2), patch, patch}).permute({0, 3, 2, 1}).reshape(
      {pos.size(0), patch * patch, pos.size(2)});
  auto dgrp = grp.numel() > 0 ? dgrp_parts.sum(0) : at::Tensor();
  return {dpos, dgrp};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GE-ViT local attention, forward (out, log-normaliser, dropout bits)");
  m.def("backward", &backward, "GE-ViT local attention, backward (writes dq, dk, dv; returns dpos, dgrp)");
}
