// Activations on at::vec SIMD vectors, so that the cells of cell_math.h run on whole
// vector registers on the CPU, float32 and float64 alike.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../cell_math.h"

namespace rnn_fused {

// The activations are written out here, and always inlined, rather than taken from Sleef:
// Sleef's functions are calls the compiler cannot inline, and every call spills the vector
// registers of the cell around it. Measured on a 2-core Intel Xeon (AVX-512): Sleef's tanhf
// took 2 of 8.5 ms of the float32 LSTM step at T=200 B=16 H=128 on one thread, and its
// float64 tanh (double-double inside) a quarter of a float64 LSTMCell call at B=97 H=51.

// Per dtype: e^r = 1 + r + r^2 P(r) on |r| <= ln2 / 2, and tanh(x) = x + x^3 Q(x^2) below
// |x| = 0.625; P and Q (highest power first) fitted here for the dtype's precision by
// Chebyshev interpolation in 40 digits. ln2 is split in two, its high part with few enough
// bits that n * ln2_hi is exact.
template <class T>
struct ActivationFit;

template <>
struct ActivationFit<float> {
  using Int = int32_t;
  static constexpr int kMantissaBits = 23, kExponentBias = 127;
  static constexpr float kExpLow = -104.0f;  // keeps n an integer; e^y is 0 well above it
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kExpPoly[] = {0.0013814608405987273f, 0.00836871043265411f,
                                       0.04166838747333898f, 0.16666520683636263f,
                                       0.4999999345112779f};
  static constexpr float kTanhPoly[] = {-0.005704992107242705f, 0.0206390935580542f,
                                        -0.05373971771734203f, 0.13331442241332242f,
                                        -0.33333281944260446f};
};

template <>
struct ActivationFit<double> {
  using Int = int64_t;
  static constexpr int kMantissaBits = 52, kExponentBias = 1023;
  static constexpr double kExpLow = -746.0;  // keeps n an integer; e^y is 0 well above it
  static constexpr double kLn2Hi = 0.6931471803691238164901733;  // 33 significant bits
  static constexpr double kLn2Lo = 1.908214929270587816144266e-10;
  static constexpr double kExpPoly[] = {2.09146793765839351e-9,
                                        2.5105206373957011116e-8,
                                        2.7557273661348636219e-7,
                                        2.7557255425746434282e-6,
                                        2.4801587325533363819e-5,
                                        1.9841269874800491981e-4,
                                        1.3888888888883752417e-3,
                                        8.333333333326140884e-3,
                                        4.1666666666666669752e-2,
                                        0.16666666666666670986,
                                        0.5};
  static constexpr double kTanhPoly[] = {
      6.48516348279311315e-6,    -3.1201101425797400033e-5, 9.2571161295567682707e-5,
      -2.3759064960555619551e-4, 5.896606577757043347e-4,   -1.4557754120478055104e-3,
      3.5921217511549622695e-3,  -8.863235103240877925e-3,  2.1869488519008305756e-2,
      -5.396825396789699169e-2,  0.13333333333333041602,    -0.33333333333333332938};
};

// sum c[k] z^(E-1-k) over k in [B, E), as (the higher terms) z^m + (the m lowest), m the
// largest power of two below E - B, each part split again: a chain of about log2(E - B)
// fused multiply-adds. zp[j] = z^(2^j).
template <size_t B, size_t E, class V, class T, size_t N>
C10_ALWAYS_INLINE V estrin(const V (&zp)[4], const T (&c)[N]) {
  constexpr size_t n = E - B;
  if constexpr (n == 1) {
    return V(c[B]);
  } else {
    constexpr size_t m = std::bit_floor(n - 1), j = std::bit_width(m) - 1;
    static_assert(j < 4, "the powers of z go up to z^8");
    return at::vec::fmadd(estrin<B, E - m>(zp, c), zp[j], estrin<E - m, E>(zp, c));
  }
}

// sum c[k] z^(N-1-k). float32 by Horner's rule. float64's polynomials (11 and 12 terms) by
// Estrin's scheme above: as a Horner chain each was 11-12 dependent multiply-adds, and the
// cell math waited on them (perf: a float64 LSTMCell's cell math ran about 200 cycles a
// vector, near its critical path; AMD EPYC Zen 3).
template <class V, class T, size_t N>
C10_ALWAYS_INLINE V polynomial(const V& z, const T (&c)[N]) {
  if constexpr (std::is_same_v<T, double>) {
    const V z2 = z * z, z4 = z2 * z2;
    const V zp[4] = {z, z2, z4, z4 * z4};
    return estrin<0, N>(zp, c);
  } else {
    V p(c[0]);
    for (size_t k = 1; k < N; ++k) p = at::vec::fmadd(p, z, V(c[k]));
    return p;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// On AVX-512 a few steps take single instructions that at::vec spells out: its maximum adds a
// NaN test (four instructions for one), its comparisons make vector masks that blendv turns
// back into mask registers, and 2^n through the exponent bits takes five instructions where
// vscalefps takes one. An LSTM unit's cell math went from 15 to 10 cycles (a loop over cached
// rows; Intel Xeon with AMX).
namespace avx512 {
inline __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512d max(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
template <int kPredicate>
inline __mmask16 compare(__m512 a, __m512 b) {
  return _mm512_cmp_ps_mask(a, b, kPredicate);
}
template <int kPredicate>
inline __mmask8 compare(__m512d a, __m512d b) {
  return _mm512_cmp_pd_mask(a, b, kPredicate);
}
inline __m512 blend(__mmask16 k, __m512 a, __m512 b) { return _mm512_mask_blend_ps(k, a, b); }
inline __m512d blend(__mmask8 k, __m512d a, __m512d b) { return _mm512_mask_blend_pd(k, a, b); }
inline __m512 scale(__mmask16 k, __m512 a, __m512 n) { return _mm512_maskz_scalef_ps(k, a, n); }
inline __m512d scale(__mmask8 k, __m512d a, __m512d n) { return _mm512_maskz_scalef_pd(k, a, n); }
}  // namespace avx512
#endif

// max(a, y) that returns y where y is NaN (a is a number).
template <class T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> max_keeping_nan(const at::vec::Vectorized<T>& a,
                                                         const at::vec::Vectorized<T>& y) {
#if defined(CPU_CAPABILITY_AVX512)
  return avx512::max(a, y);  // vmaxps returns its second operand where either is NaN
#else
  return at::vec::maximum(y, a);
#endif
}

// e^y for y <= 0, within 1 ulp: y = n ln2 + r, e^r by the fitted polynomial, times 2^n. Where
// 2^n would fall below the normal numbers e^y is 0: within the least normal number of the
// exact value. A NaN y gives NaN.
template <class T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> exp_nonpositive(const at::vec::Vectorized<T>& y) {
  using V = at::vec::Vectorized<T>;
  using F = ActivationFit<T>;
  const V yc = max_keeping_nan(V(F::kExpLow), y);
#if defined(CPU_CAPABILITY_AVX512)
  // n rounded to nearest even by adding 1.5 * 2^mantissa bits in one fused multiply-add (exact
  // for |n| below 2^(mantissa bits - 1)); 2^n applied by vscalef, zero where n < 1 - bias.
  const V shifter(T(1.5) * T(int64_t(1) << F::kMantissaBits));
  const V n = at::vec::fmadd(yc, V(T(1.4426950408889634074)), shifter) - shifter;
#else
  const V n = (yc * V(T(1.4426950408889634074))).round();
#endif
  V r = at::vec::fmadd(n, V(-F::kLn2Hi), yc);
  r = at::vec::fmadd(n, V(-F::kLn2Lo), r);
  const V e_r = at::vec::fmadd(r * r, polynomial(r, F::kExpPoly), r) + V(T(1));
#if defined(CPU_CAPABILITY_AVX512)
  // Unordered: a NaN n is kept, and stays NaN.
  const auto kept = avx512::compare<_CMP_NLE_UQ>(n, V(T(0.5) - T(F::kExponentBias)));
  return avx512::scale(kept, e_r, n);
#else
  using Int = at::vec::Vectorized<typename F::Int>;
  const Int biased = at::vec::convert_to_int_of_same_size(n) + Int(F::kExponentBias);
  const Int two_n = at::vec::maximum(biased, Int(0)) << Int(F::kMantissaBits);
  return e_r * at::vec::cast<T>(two_n);
#endif
}

// 1 / d for d in [1, 2] (the denominators below). On AVX-512 the 14-bit estimate refined
// by Newton steps, one in float32 and two in float64 (within an ulp): a division holds the
// divider about 10 cycles a vector, and an LSTM unit divides five times.
template <class T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> one_over(const at::vec::Vectorized<T>& d) {
  using V = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const V r = _mm512_rcp14_ps(d);
    return at::vec::fmadd(r, at::vec::fnmadd(d, r, V(1.0f)), r);
  } else {
    V r = _mm512_rcp14_pd(d);
    r = at::vec::fmadd(r, at::vec::fnmadd(d, r, V(1.0)), r);
    return at::vec::fmadd(r, at::vec::fnmadd(d, r, V(1.0)), r);
  }
#else
  return V(T(1)) / d;
#endif
}

// sigmoid from t = e^-|x|: 1 / (1 + t) for x >= 0, t / (1 + t) below (no overflow, no
// cancellation). The division does not wait for the sign test: dividing a blended numerator
// instead made a float32 LSTM step about 3% slower.
template <class T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> sigmoid_vec(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V t = exp_nonpositive(x | V(T(-0.0)));  // e^-|x|
  const V s = one_over(V(T(1)) + t);
#if defined(CPU_CAPABILITY_AVX512)
  return avx512::blend(avx512::compare<_CMP_GE_OQ>(x, V(T(0))), t * s, s);
#else
  return V::blendv(t * s, s, x >= V(T(0)));
#endif
}

// tanh: x + x^3 Q(x^2) below |x| = 0.625, above it 1 - 2t / (1 + t) = (1 - t) / (1 + t)
// with t = e^-2|x| and the sign of x. Within 2 ulp (tests/test_activations.py; float32 1.3
// at most over its sweep).
template <class T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> tanh_vec(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V ax = x.abs(), z = x * x;
  const V small = at::vec::fmadd(x * z, polynomial(z, ActivationFit<T>::kTanhPoly), x);
  const V t = exp_nonpositive(ax * V(T(-2)));
  // The value >= 0 takes x's sign bit by an OR: at::vec's copysign is a call into Sleef,
  // which spills the cell's registers around every tanh.
  const V large = at::vec::fnmadd(t + t, one_over(V(T(1)) + t), V(T(1))) | (x & V(T(-0.0)));
#if defined(CPU_CAPABILITY_AVX512)
  return avx512::blend(avx512::compare<_CMP_LT_OQ>(ax, V(T(0.625))), large, small);
#else
  return V::blendv(large, small, ax < V(T(0.625)));
#endif
}

// A float32 SIMD vector of the cell math of a bfloat16 call on the bfloat16 products
// (run_forward's `bf16`): the same vector, whose activations (MathOps<Bf16CellVec>) need only
// be as exact as a bfloat16 result can show. The cells take it as their V; at::vec's operators
// take it as a Vectorized<float>, and what they return converts back. Other half-type calls
// keep float32's activations: they give the float32 call's results rounded, bit for bit.
struct Bf16CellVec : at::vec::Vectorized<float> {
  using Base = at::vec::Vectorized<float>;
  using Base::Base;
  Bf16CellVec() = default;
  C10_ALWAYS_INLINE Bf16CellVec(const Base& v) : Base(v) {}  // NOLINT: implicit by design
};

#if defined(CPU_CAPABILITY_AVX512)
namespace bf16_cell {
// 2^t: 2^f 2^floor(t), f = t - floor(t) in [0, 1] by vreduceps, 2^f = 1 + f P(f) with P of
// degree 4 fitted here for the least relative error on [0, 1] (9.4e-8), 2^floor(t) applied by
// vscalefps (which floors t itself; 0 and infinity where they belong, and f is 0 at t = +-inf).
// Seven instructions, where exp_nonpositive takes fifteen for float32's last ulp.
C10_ALWAYS_INLINE __m512 exp2(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.867130050e-3f), f, _mm512_set1_ps(9.017030708e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.579991266e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.401644439e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931512952e-1f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f)), t);
}

// 1 / d for d = 1 + 2^t, t at most kMaxT (d finite for the Newton step), refined once from
// the 14-bit estimate; 0 outside `kept`. t's rounding to float32 (t = a log2(e) x) costs a
// relative error of |t| 2^-24 ln 2 in 2^t: below 4e-6 in a sigmoid or tanh that is not 0 or
// +-1 in float32.
constexpr float kMaxT = 126.0f;
C10_ALWAYS_INLINE __m512 one_over(__m512 d, __mmask16 kept) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_maskz_fmadd_ps(kept, r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
}

// sigmoid(x) = 1 / (1 + e^-x); 0 where e^-x exceeds 2^126 (the value is below the normal
// numbers), NaN for NaN (vminps returns its second operand then; the mask keeps unordered).
C10_ALWAYS_INLINE __m512 sigmoid(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f));
  const __mmask16 kept = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kMaxT), _CMP_NGT_UQ);
  const __m512 d =
      _mm512_add_ps(_mm512_set1_ps(1.0f), exp2(_mm512_min_ps(_mm512_set1_ps(kMaxT), t)));
  return one_over(d, kept);
}

// tanh(x) = 1 - 2 / (1 + e^2x) (1 exactly from x = 44, where e^2x is held at 2^126), and
// x - x^3 / 3 + 2 x^5 / 15 below |x| = 1/16, where the first form's cancellation would cost
// relative accuracy.
C10_ALWAYS_INLINE __m512 tanh(__m512 x) {
  const __m512 t =
      _mm512_min_ps(_mm512_set1_ps(kMaxT), _mm512_mul_ps(x, _mm512_set1_ps(2.8853900817779268f)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp2(t));
  const __m512 large =
      _mm512_fnmadd_ps(one_over(d, 0xffff), _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(x, x);
  const __m512 q = _mm512_fmadd_ps(z, _mm512_set1_ps(2.0f / 15), _mm512_set1_ps(-1.0f / 3));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(x, z), q, x);
  return _mm512_mask_blend_ps(
      _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0.0625f), _CMP_LT_OQ), large, small);
}
}  // namespace bf16_cell
#endif

// Those activations: within 4e-6 of the value (a thousandth of a bfloat16 ulp), in 14 and 20
// instructions where float32's last ulp takes 22 and 35. An LSTM's cell math on cached rows
// went from 65.5 to 41 TSC cycles a vector of 16 units (Intel Xeon with AMX).
template <>
struct MathOps<Bf16CellVec> {
  using V = Bf16CellVec;
#if defined(CPU_CAPABILITY_AVX512)
  C10_ALWAYS_INLINE static V sigmoid(const V& x) { return V(bf16_cell::sigmoid(x)); }
  C10_ALWAYS_INLINE static V tanh(const V& x) { return V(bf16_cell::tanh(x)); }
#else
  C10_ALWAYS_INLINE static V sigmoid(const V& x) { return sigmoid_vec<float>(x); }
  C10_ALWAYS_INLINE static V tanh(const V& x) { return tanh_vec<float>(x); }
#endif
  C10_ALWAYS_INLINE static V relu(const V& x) { return max_keeping_nan<float>(V::Base(0.0f), x); }
  C10_ALWAYS_INLINE static V relu_gradient(const V& y, const V& g) {
    return V::Base::blendv(g, V::Base(0.0f), y <= V::Base(0.0f));
  }
};

template <class T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // Forced inline: GCC kept float64's as calls, which spill the cell's vector registers.
  C10_ALWAYS_INLINE static V sigmoid(const V& x) { return sigmoid_vec(x); }
  C10_ALWAYS_INLINE static V tanh(const V& x) { return tanh_vec(x); }
  C10_ALWAYS_INLINE static V relu(const V& x) { return max_keeping_nan(V(T(0)), x); }
  // As MathOps<float>::relu_gradient: 0 where y <= 0 (false for a NaN y), else g.
  C10_ALWAYS_INLINE static V relu_gradient(const V& y, const V& g) {
    return V::blendv(g, V(T(0)), y <= V(T(0)));
  }
};

}  // namespace rnn_fused
