// Fused CPU kernel of GE-ViT / GSA-Net local attention: forward and recomputing backward, one pixel at a time.
//
// Written by hand because no library has it: neighbourhood-attention kernels (NATTEN, flex_attention) have neither
// the (output v, query g, key m) group axes nor a CPU backward. Same math and layouts as fast_attention.py:
//   L[v,g,m,d] = content[g,m,d] + spatial[v,g,d] + group[v,g,m]   (each already times `scale`; d = offset)
//   p = softmax over (m, d) of L for each (v, g); out[v] = sum_g sum_{m,d} p * value[m, x+d]
// Per pixel the three terms are exponentiated at their own sizes, each shifted by its own maximum, and the score
// block is their product (no exponential over the G^3 P^2 block); the sum of the maxima bounds the row maximum, so
// the softmax is exact; a row whose bound underflows is recomputed the direct way. Nothing of size G^3 P^2 leaves
// the pixel: the backward pass recomputes the block from q, k, v and the saved log-normaliser.
// Layouts: q [N,H,W,Gq,D]; keys and values planar and zero-padded by r = P/2, kp [N,Gk,D,H+2r,W+2r],
// vp [N,Gk,Dv,H+2r,W+2r] (a neighbourhood row is then P contiguous numbers); pos [Gv,P*P,Dpos], grp [J,Dg],
// gidx [Gv,Gq,Gk] (int64); out [N,H,W,Gv,Dv], lse [N,H,W,Gv,Gq] (log row sums, see kExactRow); the backward
// pass returns dk, dv padded planar.
// Per pixel the neighbourhood axis is (m, d): md = m * P*P + d, rows padded to a multiple of 8 (MDp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp of x <= 0 (clamped to [-87, 0]), vectorisable (Cephes expf: Cody-Waite reduction + degree-6 polynomial,
// ~1 ulp); glibc's expf has no vector form without -ffast-math, which would also assume finite math.
inline float exp_nonpos(float x) {
  x = std::min(std::max(x, -87.0f), 0.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_nonpos(double x) { return std::exp(std::min(x, 0.0)); }

// Dropout: a counter-based hash (lowbias32, C. Wellons) of (seed, pixel, element): the same masks in both passes.
inline uint32_t mix32(uint32_t x) {
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

struct Dims {
  int64_t N, H, W, Gq, Gk, Gv, D, Dv, P, P2, MD, MDp, Hp, Wp, Dpos, Dg, J;
  bool has_group;
};
// lse output: log of the row sum relative to the row's shift (sum of the three maxima), or this marker for rows
// computed the exact way (the shift bound underflowed).
template <typename T>
constexpr T kExactRow = std::numeric_limits<T>::lowest();

constexpr int64_t kBlock = 8;  // dot products over channels are accumulated 8 neighbours at a time, in registers

// Row strips (keys, values and their gradients): for the `planes` of image n ([N, planes, Hp, Wp], padded),
// strip[(p * Wp + jj) * P + a] = plane p at (row i + a, column jj), so the window of pixel j is P*P contiguous
// numbers from jj = j, in the offset order d = b * P + a.
template <typename T>
void to_strips(const Dims& s, const T* planes, int64_t count, int64_t n, int64_t i, T* strips) {
  const int64_t P = s.P, Wp = s.Wp, plane = s.Hp * Wp;
  for (int64_t p = 0; p < count; ++p) {
    const T* src = planes + (n * count + p) * plane + i * Wp;
    T* dst = strips + p * Wp * P;
    for (int64_t a = 0; a < P; ++a)
      for (int64_t jj = 0; jj < Wp; ++jj) dst[jj * P + a] = src[a * Wp + jj];
  }
}

// Adjoint of to_strips: planes += strips.
template <typename T>
void add_strips(const Dims& s, const T* strips, int64_t count, int64_t n, int64_t i, T* planes) {
  const int64_t P = s.P, Wp = s.Wp, plane = s.Hp * Wp;
  for (int64_t p = 0; p < count; ++p) {
    T* dst = planes + (n * count + p) * plane + i * Wp;
    const T* src = strips + p * Wp * P;
    for (int64_t a = 0; a < P; ++a)
      for (int64_t jj = 0; jj < Wp; ++jj) dst[a * Wp + jj] += src[jj * P + a];
  }
}

// The window of pixel j as [c][md] (row stride MDp), from strips of `channels` channels per key group element;
// with accumulate, the adjoint: strips += window.
template <typename T, bool accumulate>
void window(const Dims& s, T* strips, int64_t channels, int64_t j, T* win) {
  const int64_t P2 = s.P2, strip = s.Wp * s.P;
  for (int64_t m = 0; m < s.Gk; ++m)
    for (int64_t c = 0; c < channels; ++c) {
      T* st = strips + (m * channels + c) * strip + j * s.P;
      T* w = win + c * s.MDp + m * P2;
      for (int64_t t = 0; t < P2; ++t) {
        if constexpr (accumulate) st[t] += w[t];
        else w[t] = st[t];
      }
    }
}

// out[t] = sum_c w[c] * x[c * stride + t] for t < n (n a multiple of kBlock), in vector registers, four blocks at a
// time so that the multiply-adds do not wait on each other (GCC/Clang vector extension: the auto-vectoriser
// vectorises the channel loop instead and keeps the accumulators in memory).
template <typename T>
inline void block_dots(const T* w, const T* x, int64_t channels, int64_t stride, int64_t n, T* out) {
  typedef T vec __attribute__((vector_size(kBlock * sizeof(T))));
  int64_t b0 = 0;
  for (; b0 + 4 * kBlock <= n; b0 += 4 * kBlock) {
    vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t c = 0; c < channels; ++c) {
      const T* xc = x + c * stride + b0;
      vec x0, x1, x2, x3;
      std::memcpy(&x0, xc, sizeof(vec));
      std::memcpy(&x1, xc + kBlock, sizeof(vec));
      std::memcpy(&x2, xc + 2 * kBlock, sizeof(vec));
      std::memcpy(&x3, xc + 3 * kBlock, sizeof(vec));
      a0 += w[c] * x0;
      a1 += w[c] * x1;
      a2 += w[c] * x2;
      a3 += w[c] * x3;
    }
    std::memcpy(out + b0, &a0, sizeof(vec));
    std::memcpy(out + b0 + kBlock, &a1, sizeof(vec));
    std::memcpy(out + b0 + 2 * kBlock, &a2, sizeof(vec));
    std::memcpy(out + b0 + 3 * kBlock, &a3, sizeof(vec));
  }
  for (; b0 < n; b0 += kBlock) {
    vec acc = {};
    for (int64_t c = 0; c < channels; ++c) {
      vec xv;
      std::memcpy(&xv, x + c * stride + b0, sizeof(vec));
      acc += w[c] * xv;
    }
    std::memcpy(out + b0, &acc, sizeof(vec));
  }
}

// Per-thread scratch for one pixel; the score terms of one pixel, computed identically in both passes.
template <typename T>
struct Pixel {
  const Dims& s;
  std::vector<T> Kt, Vt, mask, C, eC, S, eS, A, eA, cmax, smax, amax, qg, qs;

  explicit Pixel(const Dims& dims)
      : s(dims), Kt(dims.D * dims.MDp, T(0)), Vt(dims.Dv * dims.MDp, T(0)), mask(dims.MDp, T(0)),
        C(dims.Gq * dims.MDp), eC(dims.Gq * dims.MDp), S(dims.Gv * dims.Gq * dims.P2),
        eS(dims.Gv * dims.Gq * dims.P2), A(dims.Gv * dims.Gq * dims.Gk), eA(dims.Gv * dims.Gq * dims.Gk),
        cmax(dims.Gq), smax(dims.Gv * dims.Gq), amax(dims.Gv * dims.Gq),
        qg(dims.Gq * std::max<int64_t>(dims.J, 1)), qs(dims.D) {}

  // Keys and values of pixel (n, i, j) as [c][md] (zeros outside, from the padding); strips() first, per row.
  std::vector<T> ks, vs;
  void strips(const T* kp, const T* vp, int64_t n, int64_t i) {
    ks.resize(s.Gk * s.D * s.Wp * s.P);
    vs.resize(s.Gk * s.Dv * s.Wp * s.P);
    to_strips(s, kp, s.Gk * s.D, n, i, ks.data());
    to_strips(s, vp, s.Gk * s.Dv, n, i, vs.data());
  }

  void gather(int64_t i, int64_t j) {
    const int64_t r = s.P / 2, P = s.P, P2 = s.P2;
    for (int64_t b = 0; b < P; ++b) {
      const bool col_in = j + b - r >= 0 && j + b - r < s.W;
      for (int64_t a = 0; a < P; ++a) {
        const bool in = col_in && i + a - r >= 0 && i + a - r < s.H;
        for (int64_t m = 0; m < s.Gk; ++m) mask[m * P2 + b * P + a] = in ? T(1) : T(0);
      }
    }
    window<T, false>(s, ks.data(), s.D, j, Kt.data());
    window<T, false>(s, vs.data(), s.Dv, j, Vt.data());
  }

  // Content, spatial and group terms (times scale), their maxima over the neighbourhood and shifted exponentials.
  void scores(const T* q, const T* posT, const T* grp, const int64_t* gidx, T scale) {
    const int64_t MD = s.MD, MDp = s.MDp, P2 = s.P2, Gq = s.Gq, Gk = s.Gk, Gv = s.Gv;
    const T lowest = std::numeric_limits<T>::lowest();
    for (int64_t g = 0; g < Gq; ++g) {
      const T* qr = q + g * s.D;
      T* Cg = C.data() + g * MDp;
      for (int64_t c = 0; c < s.D; ++c) qs[c] = qr[c] * scale;
      block_dots(qs.data(), Kt.data(), s.D, MDp, MDp, Cg);
      T mx = lowest;
      for (int64_t md = 0; md < MD; ++md) mx = std::max(mx, mask[md] > T(0) ? Cg[md] : lowest);
      cmax[g] = mx;
      T* eCg = eC.data() + g * MDp;
      for (int64_t md = 0; md < MD; ++md) eCg[md] = exp_nonpos(Cg[md] - mx) * mask[md];
      for (int64_t v = 0; v < Gv; ++v) {
        T* Svg = S.data() + (v * Gq + g) * P2;
        std::fill(Svg, Svg + P2, T(0));
        for (int64_t c = 0; c < s.Dpos; ++c) {
          const T a = qr[c] * scale;
          const T* pr = posT + (v * s.Dpos + c) * P2;
          for (int64_t dd = 0; dd < P2; ++dd) Svg[dd] += a * pr[dd];
        }
        T sm = lowest;
        for (int64_t dd = 0; dd < P2; ++dd) sm = std::max(sm, mask[dd] > T(0) ? Svg[dd] : lowest);
        smax[v * Gq + g] = sm;
        T* eSvg = eS.data() + (v * Gq + g) * P2;
        for (int64_t dd = 0; dd < P2; ++dd) eSvg[dd] = exp_nonpos(Svg[dd] - sm);
      }
      if (s.has_group) {
        for (int64_t jx = 0; jx < s.J; ++jx) {
          T acc = 0;
          for (int64_t c = 0; c < s.Dg; ++c) acc += qr[s.Dpos + c] * grp[jx * s.Dg + c];
          qg[g * s.J + jx] = acc * scale;
        }
      }
    }
    for (int64_t vg = 0; vg < Gv * Gq; ++vg) {
      const int64_t g = vg % Gq;
      T* Avg = A.data() + vg * Gk;
      T am = T(0);
      if (s.has_group) {
        am = lowest;
        for (int64_t m = 0; m < Gk; ++m) {
          Avg[m] = qg[g * s.J + gidx[vg * Gk + m]];
          am = std::max(am, Avg[m]);
        }
      } else {
        std::fill(Avg, Avg + Gk, T(0));
      }
      amax[vg] = am;
      for (int64_t m = 0; m < Gk; ++m) eA[vg * Gk + m] = exp_nonpos(Avg[m] - am);
    }
  }

  // row[md] = exp(L[v,g,md] - shift) * f (shift = cmax + smax + amax) as the product of the three factors; returns the row sum.
  T factored_row(int64_t v, int64_t g, T* row, T f) const {
    const int64_t P2 = s.P2, vg = v * s.Gq + g;
    const T* eCg = eC.data() + g * s.MDp;
    const T* eSvg = eS.data() + vg * P2;
    T z = 0;
    for (int64_t m = 0; m < s.Gk; ++m) {
      const T a = eA[vg * s.Gk + m] * f;
      const T* ec = eCg + m * P2;
      T* rr = row + m * P2;
      for (int64_t dd = 0; dd < P2; ++dd) {
        rr[dd] = ec[dd] * eSvg[dd] * a;
        z += rr[dd];
      }
    }
    return z;
  }

  // row[md] = exp(L[v,g,md] - ref) computed directly; with find_max, ref is set to the exact row maximum first.
  // Returns the row sum.
  T exact_row(int64_t v, int64_t g, T* row, T* ref, bool find_max) const {
    const int64_t P2 = s.P2, vg = v * s.Gq + g;
    const T lowest = std::numeric_limits<T>::lowest();
    T mx = lowest;
    for (int64_t m = 0; m < s.Gk; ++m)
      for (int64_t dd = 0; dd < P2; ++dd) {
        const int64_t md = m * P2 + dd;
        row[md] = C[g * s.MDp + md] + S[vg * P2 + dd] + A[vg * s.Gk + m];
        mx = std::max(mx, mask[md] > T(0) ? row[md] : lowest);
      }
    if (find_max) *ref = mx;
    T z = 0;
    for (int64_t md = 0; md < s.MD; ++md) {
      row[md] = exp_nonpos(row[md] - *ref) * mask[md];
      z += row[md];
    }
    return z;
  }

  // keep[md] = scale if score (v, g, md) is kept by dropout, else 0: 16 random bits per score, the two halves of
  // hash (seed, pixel, v, g, t) for md = t and md = t + ceil(MD / 2) (two contiguous stores: vectorisable).
  void keep_factors(int64_t v, int64_t g, T* keep, uint32_t key, uint32_t threshold, T scale) const {
    const int64_t half = (s.MD + 1) / 2, rest = s.MD - half;
    const uint32_t base = key + static_cast<uint32_t>((v * s.Gq + g) * half);
    T* hi = keep + half;
    for (int64_t t = 0; t < rest; ++t) {
      const uint32_t h = mix32(base + static_cast<uint32_t>(t));
      keep[t] = (h & 0xffffU) >= threshold ? scale : T(0);
      hi[t] = (h >> 16) >= threshold ? scale : T(0);
    }
    if (half > rest) keep[half - 1] = (mix32(base + static_cast<uint32_t>(half - 1)) & 0xffffU) >= threshold ? scale : T(0);
  }
};

Dims make_dims(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& pos,
               const at::Tensor& grp, int64_t patch) {
  Dims s;
  s.N = q.size(0); s.H = q.size(1); s.W = q.size(2); s.Gq = q.size(3); s.D = q.size(4);
  s.Gk = kp.size(1); s.Dv = vp.size(2); s.Gv = pos.size(0); s.P = patch; s.P2 = patch * patch;
  s.MD = s.Gk * s.P2; s.MDp = (s.MD + kBlock - 1) / kBlock * kBlock; s.Dpos = pos.size(2);
  s.Hp = s.H + 2 * (patch / 2); s.Wp = s.W + 2 * (patch / 2);
  s.has_group = grp.numel() > 0;
  s.J = s.has_group ? grp.size(0) : 0;
  s.Dg = s.has_group ? grp.size(1) : 0;
  TORCH_CHECK(pos.size(1) == s.P2, "positional table has ", pos.size(1), " offsets, patch ", patch, " needs ", s.P2);
  TORCH_CHECK(s.Dpos + s.Dg <= s.D, "positional + group channels exceed the query channels");
  TORCH_CHECK(kp.size(2) == s.D && kp.size(3) == s.Hp && kp.size(4) == s.Wp, "keys must be [N, Gk, D, H+2r, W+2r]");
  TORCH_CHECK(vp.size(1) == s.Gk && vp.size(3) == s.Hp && vp.size(4) == s.Wp, "values must be [N, Gk, Dv, H+2r, W+2r]");
  TORCH_CHECK(q.is_contiguous() && kp.is_contiguous() && vp.is_contiguous() && pos.is_contiguous(),
              "inputs must be contiguous");
  return s;
}

// pos [Gv, P2 (a * P + b), Dpos] -> [Gv, Dpos, P2 (b * P + a)]: the kernel's offset order, offsets innermost
at::Tensor pos_transposed(const at::Tensor& pos, int64_t P) {
  return pos.reshape({pos.size(0), P, P, pos.size(2)}).permute({0, 3, 2, 1}).contiguous().view({pos.size(0), pos.size(2), P * P});
}

uint32_t drop_threshold(double p) { return static_cast<uint32_t>(std::min(65536.0, std::ceil(p * 65536.0))); }

}  // namespace

// Keep probability of the dropout masks (exact: P(16 random bits >= threshold)).
double keep_probability(double p) { return (65536.0 - drop_threshold(p)) / 65536.0; }

// 1 / keep probability (0 when everything is dropped).
double keep_scale_of(double p) { return keep_probability(p) > 0 ? 1.0 / keep_probability(p) : 0.0; }

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& pos,
                                const at::Tensor& grp, const at::Tensor& gidx, double scale, int64_t patch,
                                double dropout, int64_t seed) {
  const Dims s = make_dims(q, kp, vp, pos, grp, patch);
  auto out = at::empty({s.N, s.H, s.W, s.Gv, s.Dv}, q.options());
  auto lse = at::empty({s.N, s.H, s.W, s.Gv, s.Gq}, q.options());
  const at::Tensor posT = pos_transposed(pos, patch);
  const uint32_t threshold = dropout > 0 ? drop_threshold(dropout) : 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gevit_local_attention_forward", [&] {
    using T = scalar_t;
    const T* qd = q.data_ptr<T>();
    const T* kd = kp.data_ptr<T>();
    const T* vd = vp.data_ptr<T>();
    const T* pd = posT.data_ptr<T>();
    const T* gd = s.has_group ? grp.data_ptr<T>() : nullptr;
    const int64_t* xd = s.has_group ? gidx.data_ptr<int64_t>() : nullptr;
    T* od = out.data_ptr<T>();
    T* ld = lse.data_ptr<T>();
    const T tiny = std::numeric_limits<T>::min() * T(1e8);
    const T keep_scale = dropout > 0 ? T(keep_scale_of(dropout)) : T(1);
    const int64_t MD = s.MD, MDp = s.MDp;
    at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
      Pixel<T> px(s);
      std::vector<T> row(MDp), keep(MDp), wsum(s.Gv * MDp, T(0));
      for (int64_t ni = begin; ni < end; ++ni) {
        const int64_t n = ni / s.H, i = ni % s.H;
        px.strips(kd, vd, n, i);
        for (int64_t j = 0; j < s.W; ++j) {
          const int64_t pixel = ni * s.W + j;
          px.gather(i, j);
          px.scores(qd + pixel * s.Gq * s.D, pd, gd, xd, T(scale));
          const uint32_t key = dropout > 0 ? pixel_key(seed, pixel) : 0;
          for (int64_t vv = 0; vv < s.Gv; ++vv) {
            T* wv = wsum.data() + vv * MDp;
            std::fill(wv, wv + MD, T(0));
            for (int64_t g = 0; g < s.Gq; ++g) {
              T z = px.factored_row(vv, g, row.data(), T(1));
              T log_z;
              if (z < tiny) {  // the shift bound was too loose: exact maximum (the backward pass redoes this)
                T mx;
                z = px.exact_row(vv, g, row.data(), &mx, true);
                log_z = kExactRow<T>;
              } else {
                log_z = std::log(z);
              }
              ld[(pixel * s.Gv + vv) * s.Gq + g] = log_z;
              const T w = keep_scale / z;
              if (dropout > 0) {
                px.keep_factors(vv, g, keep.data(), key, threshold, w);
                for (int64_t md = 0; md < MD; ++md) wv[md] += row[md] * keep[md];
              } else {
                for (int64_t md = 0; md < MD; ++md) wv[md] += row[md] * w;
              }
            }
            T* o = od + (pixel * s.Gv + vv) * s.Dv;
            for (int64_t c = 0; c < s.Dv; ++c) {
              const T* vc = px.Vt.data() + c * MDp;
              T acc = 0;
              for (int64_t md = 0; md < MD; ++md) acc += wv[md] * vc[md];
              o[c] = acc;
            }
          }
        }
      }
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kp,
                                 const at::Tensor& vp, const at::Tensor& pos, const at::Tensor& grp,
                                 const at::Tensor& gidx, const at::Tensor& lse, double scale, int64_t patch,
                                 double dropout, int64_t seed) {
  const Dims s = make_dims(q, kp, vp, pos, grp, patch);
  auto dq = at::zeros_like(q);
  auto dkp = at::zeros_like(kp);
  auto dvp = at::zeros_like(vp);
  const at::Tensor posT = pos_transposed(pos, patch);
  const int64_t threads = at::get_num_threads();
  auto dposT_parts = at::zeros({threads, s.Gv, s.Dpos, s.P2}, q.options());
  auto dgrp_parts = at::zeros({threads, std::max<int64_t>(s.J, 1), std::max<int64_t>(s.Dg, 1)}, q.options());
  const uint32_t threshold = dropout > 0 ? drop_threshold(dropout) : 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gevit_local_attention_backward", [&] {
    using T = scalar_t;
    const T* god = grad_out.data_ptr<T>();
    const T* qd = q.data_ptr<T>();
    const T* kd = kp.data_ptr<T>();
    const T* vd = vp.data_ptr<T>();
    const T* pd = posT.data_ptr<T>();
    const T* gd = s.has_group ? grp.data_ptr<T>() : nullptr;
    const int64_t* xd = s.has_group ? gidx.data_ptr<int64_t>() : nullptr;
    const T* ld = lse.data_ptr<T>();
    T* dqd = dq.data_ptr<T>();
    T* dkd = dkp.data_ptr<T>();
    T* dvd = dvp.data_ptr<T>();
    const T keep_scale = dropout > 0 ? T(keep_scale_of(dropout)) : T(1);
    const T sc = T(scale);
    const int64_t MD = s.MD, MDp = s.MDp, P2 = s.P2, strip = s.Wp * s.P;
    // Whole images per task: the scatters into dk, dv of one image never cross tasks.
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      T* dposT = dposT_parts.data_ptr<T>() + tid * s.Gv * s.Dpos * P2;
      T* dgrp = dgrp_parts.data_ptr<T>() + tid * std::max<int64_t>(s.J, 1) * std::max<int64_t>(s.Dg, 1);
      Pixel<T> px(s);
      std::vector<T> prob(MDp), kept(MDp, T(0)), dP(s.Gv * MDp), wsum(s.Gv * MDp), dC(s.Gq * MDp),
          dS(s.Gv * s.Gq * P2), dA(s.Gv * s.Gq * s.Gk), dqg(s.Gq * std::max<int64_t>(s.J, 1)), dwin(std::max(s.D, s.Dv) * MDp),
          dks(s.Gk * s.D * strip), dvs(s.Gk * s.Dv * strip);  // gradients of the row strips
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t i = 0; i < s.H; ++i) {
          px.strips(kd, vd, n, i);
          std::fill(dks.begin(), dks.end(), T(0));
          std::fill(dvs.begin(), dvs.end(), T(0));
          for (int64_t j = 0; j < s.W; ++j) {
            const int64_t pixel = (n * s.H + i) * s.W + j;
            const T* qp = qd + pixel * s.Gq * s.D;
            const T* go = god + pixel * s.Gv * s.Dv;
            px.gather(i, j);
            px.scores(qp, pd, gd, xd, sc);
            const uint32_t key = dropout > 0 ? pixel_key(seed, pixel) : 0;
            for (int64_t vv = 0; vv < s.Gv; ++vv) {  // dP[v, md] = go[v] . value[md]
              T* dPv = dP.data() + vv * MDp;
              block_dots(go + vv * s.Dv, px.Vt.data(), s.Dv, MDp, MDp, dPv);
            }
            std::fill(wsum.begin(), wsum.end(), T(0));
            std::fill(dC.begin(), dC.end(), T(0));
            std::fill(dS.begin(), dS.end(), T(0));
            for (int64_t vv = 0; vv < s.Gv; ++vv) {
              const T* dPv = dP.data() + vv * MDp;
              T* wv = wsum.data() + vv * MDp;
              for (int64_t g = 0; g < s.Gq; ++g) {
                const int64_t vg = vv * s.Gq + g;
                const T log_z = ld[pixel * s.Gv * s.Gq + vg];
                if (log_z == kExactRow<T>) {  // the forward pass took the exact path for this row
                  T mx;
                  const T z = px.exact_row(vv, g, prob.data(), &mx, true);
                  for (int64_t md = 0; md < MD; ++md) prob[md] /= z;
                } else {  // relative to the shift: no cancellation between large logits and their normaliser
                  px.factored_row(vv, g, prob.data(), std::exp(-log_z));
                }
                if (dropout > 0) {
                  px.keep_factors(vv, g, kept.data(), key, threshold, keep_scale);
                  for (int64_t md = 0; md < MD; ++md) kept[md] *= prob[md];
                } else {
                  for (int64_t md = 0; md < MD; ++md) kept[md] = prob[md];
                }
                T rs = 0;
                for (int64_t md = 0; md < MD; ++md) {
                  wv[md] += kept[md];
                  rs += kept[md] * dPv[md];
                }
                T* dCg = dC.data() + g * MDp;
                T* dSvg = dS.data() + vg * P2;
                for (int64_t m = 0; m < s.Gk; ++m) {
                  T acc = 0;
                  for (int64_t dd = 0; dd < P2; ++dd) {
                    const int64_t md = m * P2 + dd;
                    const T d = kept[md] * dPv[md] - prob[md] * rs;  // softmax backward
                    dCg[md] += d;
                    dSvg[dd] += d;
                    acc += d;
                  }
                  dA[vg * s.Gk + m] = acc;
                }
              }
            }
            // Content: dq[g] += sc * dC[g] . K; dK += sc * q[g] dC[g] (scattered into the padded planar dk)
            T* dqp = dqd + pixel * s.Gq * s.D;
            for (int64_t g = 0; g < s.Gq; ++g) {
              const T* dCg = dC.data() + g * MDp;
              for (int64_t c = 0; c < s.D; ++c) {
                const T* kc = px.Kt.data() + c * MDp;
                T acc = 0;
                for (int64_t md = 0; md < MD; ++md) acc += dCg[md] * kc[md];
                dqp[g * s.D + c] += sc * acc;
              }
            }
            for (int64_t c = 0; c < s.D; ++c) {  // dK window [c][md]
              T* tmp = dwin.data() + c * MDp;
              std::fill(tmp, tmp + MD, T(0));
              for (int64_t g = 0; g < s.Gq; ++g) {
                const T a = sc * qp[g * s.D + c];
                const T* dCg = dC.data() + g * MDp;
                for (int64_t md = 0; md < MD; ++md) tmp[md] += a * dCg[md];
              }
            }
            window<T, true>(s, dks.data(), s.D, j, dwin.data());
            // Values: dV[md] += sum_v wsum[v, md] go[v]
            for (int64_t c = 0; c < s.Dv; ++c) {  // dV window [c][md]
              T* tmp = dwin.data() + c * MDp;
              std::fill(tmp, tmp + MD, T(0));
              for (int64_t vv = 0; vv < s.Gv; ++vv) {
                const T a = go[vv * s.Dv + c];
                const T* wv = wsum.data() + vv * MDp;
                for (int64_t md = 0; md < MD; ++md) tmp[md] += a * wv[md];
              }
            }
            window<T, true>(s, dvs.data(), s.Dv, j, dwin.data());
            // Spatial: dq[g, :Dpos] += sc * dS[v,g] . posT[v]; dposT[v] += sc * q[g, :Dpos] dS[v,g]
            for (int64_t vv = 0; vv < s.Gv; ++vv) {
              for (int64_t g = 0; g < s.Gq; ++g) {
                const T* dSvg = dS.data() + (vv * s.Gq + g) * P2;
                for (int64_t c = 0; c < s.Dpos; ++c) {
                  const T* pc = pd + (vv * s.Dpos + c) * P2;
                  T* dpc = dposT + (vv * s.Dpos + c) * P2;
                  const T a = sc * qp[g * s.D + c];
                  T acc = 0;
                  for (int64_t dd = 0; dd < P2; ++dd) {
                    acc += dSvg[dd] * pc[dd];
                    dpc[dd] += a * dSvg[dd];
                  }
                  dqp[g * s.D + c] += sc * acc;
                }
              }
            }
            // Group: dqg[g, j] = sc * sum of dA over (v, m) with gidx[v,g,m] = j
            if (s.has_group) {
              std::fill(dqg.begin(), dqg.end(), T(0));
              for (int64_t vg = 0; vg < s.Gv * s.Gq; ++vg) {
                const int64_t g = vg % s.Gq;
                for (int64_t m = 0; m < s.Gk; ++m) dqg[g * s.J + xd[vg * s.Gk + m]] += sc * dA[vg * s.Gk + m];
              }
              for (int64_t g = 0; g < s.Gq; ++g) {
                for (int64_t jx = 0; jx < s.J; ++jx) {
                  const T a = dqg[g * s.J + jx];
                  for (int64_t c = 0; c < s.Dg; ++c) {
                    dqp[g * s.D + s.Dpos + c] += a * gd[jx * s.Dg + c];
                    dgrp[jx * s.Dg + c] += a * qp[g * s.D + s.Dpos + c];
                  }
                }
              }
            }
          }
          add_strips(s, dks.data(), s.Gk * s.D, n, i, dkd);  // the row's gradients into the padded planar dk, dv
          add_strips(s, dvs.data(), s.Gk * s.Dv, n, i, dvd);
        }
      }
    });
  });
  auto dpos = dposT_parts.sum(0).view({s.Gv, s.Dpos, s.P, s.P}).permute({0, 3, 2, 1}).reshape({s.Gv, s.P2, s.Dpos});
  auto dgrp = s.has_group ? dgrp_parts.sum(0) : at::Tensor();
  return {dq, dkp, dvp, dpos, dgrp};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GE-ViT local attention, forward (out, log-normaliser)");
  m.def("backward", &backward, "GE-ViT local attention, backward (dq, dk, dv, dpos, dgrp)");
}
