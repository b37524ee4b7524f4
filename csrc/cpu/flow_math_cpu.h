// Scalar math helpers of the CPU kernels, written so that GCC/Clang vectorize the loops that
// call them (private to csrc/cpu).
//
// Why not libm: the extension is built for baseline x86-64 (no -march, no -ffast-math), where a
// call to logf/cosf inside a loop is never vectorized, and a `c ? f(x) : y` whose FP work sits on
// one side only is not if-converted either (the compiler must assume FP operations can trap).
// Measured on the build machine, per float: glibc logf ~4.5 ns and cosf ~11 ns in a loop, against
// ~1.9 ns and ~1.6 ns for the versions below once vectorized. So every select below computes both
// sides and blends their bits, and log/cos are short polynomials:
//   * log_f32: max error 0.80 ulp over all positive floats (subnormals included), exact at 1,
//     +inf -> +inf, NaN -> NaN. Callers never pass values <= 0.
//   * cos_f32 on [0, 2π]: max abs error 9.3e-8 against the double-precision cosine of the same
//     float argument (every argument 2π·k·2⁻²⁴ checked).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace flowkernels {
namespace cpu_math {

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline uint64_t bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline double from_bits(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// c ? a : b for an already computed a and b, as a bit blend: the compiler keeps both operands
// unconditional, so the enclosing loop stays branch-free and vectorizable.
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return from_bits((bits(a) & m) | (bits(b) & ~m));
}
inline double select(bool c, double a, double b) {
  const uint64_t m = uint64_t{0} - static_cast<uint64_t>(c);
  return from_bits((bits(a) & m) | (bits(b) & ~m));
}

inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// ---------------------------------------------------------------------------------------------
// Storage <-> accumulation conversions. float/double are plain casts. The c10 Half/BFloat16
// conversion operators are exact but written with branches, which kept every bfloat16/float16
// loop scalar (measured: float16 kernels 5-10x slower than float32). These are the same
// algorithms (round to nearest even; NaN stays NaN) as branch-free integer code; checked
// bit-identical to c10 on all 65536 inputs (load) and on every 7th float32 bit pattern (store).

template <typename T>
struct Io {
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};

template <>
struct Io<c10::BFloat16> {
  static float load(c10::BFloat16 v) { return from_bits(static_cast<uint32_t>(v.x) << 16); }
  static c10::BFloat16 store(float f) {
    const uint32_t u = bits(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const uint32_t out = select((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded);
    return c10::BFloat16(static_cast<uint16_t>(out), c10::BFloat16::from_bits());
  }
};

template <>
struct Io<c10::Half> {
  static float load(c10::Half v) {
    const uint32_t w = static_cast<uint32_t>(v.x) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    // Normal halves: move exponent/mantissa into place and rebias with one multiply.
    const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
    // Subnormal halves: mantissa as the low bits of 0.5·2^k, minus 0.5.
    const float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | select(two_w < (1u << 27), bits(subnormal), bits(normal)));
  }
  static c10::Half store(float f) {
    // The FP add rounds the mantissa to 10 bits at the right exponent (normal and subnormal
    // results alike); overflow saturates to inf through the 2^112 scaling; NaN -> 0x7E00.
    float base = (std::fabs(f) * 0x1p+112f) * 0x1p-110f;
    const uint32_t w = bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = select(bias < 0x71000000u, 0x71000000u, bias);
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    const uint32_t out = (sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign);
    return c10::Half(static_cast<uint16_t>(out), c10::Half::from_bits());
  }
};

template <typename T>
inline auto load(T v) {
  return Io<T>::load(v);
}
template <typename T, typename A>
inline T store(A v) {
  return Io<T>::store(v);
}

// ---------------------------------------------------------------------------------------------
// Transcendentals.

// Natural log of x > 0: x = 2^k·(1+f) with 1+f in [√½, √2), log(1+f) = 2·atanh(s),
// s = f/(2+f), with the odd series in s replaced by a degree-8 minimax polynomial.
inline float log_f32(float x) {
  // Subnormals are scaled by 2^25 into the normal range first.
  const bool sub = x < 0x1p-126f;
  const float xs = select(sub, x * 0x1p25f, x);
  uint32_t ix = bits(xs) + (0x3f800000u - 0x3f3504f3u);
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f - (sub ? 25 : 0);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = from_bits(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float r = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  // k·ln2 is split in a high part with trailing zero bits (exact products) and a low part.
  const float y = s * (hfsq + r) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
  return select(bits(x) >= 0x7f800000u, x, y);
}

inline double log_any(double x) { return std::log(x); }
inline float log_any(float x) { return log_f32(x); }

// cos(θ) for θ in [0, 2π]: θ = q·π/2 + r with π/2 split in three parts (q ≤ 4, so every q·part
// is exact), then a sine or cosine polynomial on r in [−π/4, π/4] chosen by q.
inline float cos_f32(float theta) {
  const int32_t q = static_cast<int32_t>(theta * 0.636619772367581343f + 0.5f);
  const float qf = static_cast<float>(q);
  const float r = ((theta - qf * 1.5703125f) - qf * 4.837512969970703125e-4f) -
                  qf * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float sn =
      r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cs = 1.0f - 0.5f * r2 +
                   r2 * r2 *
                       (4.166664568298827e-2f +
                        r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const float v = select((q & 1) != 0, sn, cs);
  // Quadrants 1 and 2 flip the sign.
  return from_bits(bits(v) ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// out[j] = sqrt(a[j])·c[j]. sqrtf in a loop keeps its errno path (a call) and is not vectorized
// under the default -fmath-errno, so SSE2 (baseline on x86-64) is used directly when present;
// both compute the correctly rounded square root.
inline void sqrt_mul(const float* a, const float* c, float* out, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= n; j += 4) {
    _mm_storeu_ps(out + j, _mm_mul_ps(_mm_sqrt_ps(_mm_loadu_ps(a + j)), _mm_loadu_ps(c + j)));
  }
#endif
  for (; j < n; ++j) out[j] = std::sqrt(a[j]) * c[j];
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 + Box-Muller, identical to flowkernels/random.py: key (seed_lo, seed_hi),
// counter (c_lo, c_hi, 0, 0), z = sqrt(−2·ln u0)·cos(2π·u1) in float32 from outputs 0 and 1.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kNoiseBlock = 2048;

// out[j] = standard normal of counter c0 + j, for j in [0, n), n <= kNoiseBlock.
inline void philox_normal_block(uint64_t c0, uint32_t key0, uint32_t key1, int64_t n, float* out) {
  float radius2[kNoiseBlock];  // −2·ln u0
  float cosine[kNoiseBlock];   // cos(2π·u1)
  const float two_pi = static_cast<float>(6.28318530717958647692528676655900);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t c = c0 + static_cast<uint64_t>(j);
    uint32_t x0 = static_cast<uint32_t>(c), x1 = static_cast<uint32_t>(c >> 32), x2 = 0, x3 = 0;
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * x0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * x2;
      const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
      const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
      x1 = static_cast<uint32_t>(p1);
      x3 = static_cast<uint32_t>(p0);
      x0 = y0;
      x2 = y2;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    // (2·(r0>>9)+1) < 2^24 and r1>>8 < 2^24 convert to float exactly.
    const float u0 = static_cast<float>(static_cast<int32_t>(2u * (x0 >> 9) + 1u)) * 0x1p-24f;
    const float u1 = static_cast<float>(static_cast<int32_t>(x1 >> 8)) * 0x1p-24f;
    radius2[j] = -2.0f * log_f32(u0);
    cosine[j] = cos_f32(two_pi * u1);
  }
  sqrt_mul(radius2, cosine, out, n);
}

}  // namespace cpu_math
}  // namespace flowkernels
