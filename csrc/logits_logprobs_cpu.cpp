// CPU kernel of tpo_fast.logits_logprobs: rows in parallel (at::parallel_for), each row swept once.
//
// A row is processed in blocks of kBlock logits converted to fp32 into an L1-resident buffer, so each
// logit is read from memory once; the block max and the block sum-exp then read the buffer. The math
// uses GCC/clang vector extensions (a branch-free exp, no -ffast-math, so -inf and NaN keep their
// meaning): 4 fp32 lanes by default (SSE2 / NEON), 8 lanes in an AVX2+FMA variant of the same
// template that x86-64 CPUs get at run time. The dtype conversions are plain loops g++ vectorises.
#include "logits_logprobs.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only cross always-inlined internal calls
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TPO_FAST_X86 1
#endif

#define TPO_FAST_INLINE inline __attribute__((always_inline))

namespace tpo_fast {
namespace {

constexpr int64_t kBlock = 2048;  // 8 KiB of fp32 per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

TPO_FAST_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

TPO_FAST_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Branch-free expf (Cephes polynomial, ~1 ulp). exp(-inf) = 0, exp(NaN) = NaN, results below
// FLT_MIN flush to 0; callers pass x <= ~0. Written once for scalars and vectors (S = float or a
// vector of floats, I the matching int type).
template <typename S, typename I>
TPO_FAST_INLINE S exp_any(S x) {
  const S lo = S{} + -87.33654475f, hi = S{} + 88.0f, zero = S{};
  S xc = x < lo ? lo : x;  // -inf -> lo; NaN stays NaN
  xc = xc > hi ? hi : xc;
  S fx = xc * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest via 1.5 * 2^23
  const S r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  S y = S{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const S fn = xc == xc ? fx : zero;  // keeps the int conversion defined for NaN
  I bits;
  if constexpr (std::is_same_v<S, float>) {
    bits = (static_cast<int32_t>(fn) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(fn, I) + 127) << 23;
  }
  S scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? zero : y * scale;
}

TPO_FAST_INLINE float exp_scalar(float x) { return exp_any<float, int32_t>(x); }

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  using F = f32x4;
  using I = i32x4;
};
template <>
struct VecTypes<8> {
  using F = f32x8;
  using I = i32x8;
};

template <int W>
struct Vec {
  using F = typename VecTypes<W>::F;
  using I = typename VecTypes<W>::I;

  static TPO_FAST_INLINE F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static TPO_FAST_INLINE void store(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }
  static TPO_FAST_INLINE F splat(float x) { return F{} + x; }
  static TPO_FAST_INLINE F exp(F x) { return exp_any<F, I>(x); }
  static TPO_FAST_INLINE float hmax(F v) {
    float m = v[0];
    for (int j = 1; j < W; ++j) m = v[j] > m ? v[j] : m;
    return m;
  }
  static TPO_FAST_INLINE float hsum(F v) {
    float s = 0.0f;
    for (int j = 0; j < W; ++j) s += v[j];
    return s;
  }
};

// NaN is skipped by the max; it reaches the row through the sum-exp instead.
template <int W>
TPO_FAST_INLINE float block_max(const float* v, int64_t len) {
  using V = Vec<W>;
  typename V::F a = V::splat(kNegInf), b = a;  // two chains hide the latency
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const typename V::F x0 = V::load(v + i), x1 = V::load(v + i + W);
    a = x0 > a ? x0 : a;
    b = x1 > b ? x1 : b;
  }
  a = b > a ? b : a;
  float m = V::hmax(a);
  for (; i < len; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <int W>
TPO_FAST_INLINE float block_sum_exp(const float* v, int64_t len, float shift) {
  using V = Vec<W>;
  const typename V::F sh = V::splat(shift);
  typename V::F a = V::splat(0.0f), b = a;
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    a += V::exp(V::load(v + i) - sh);
    b += V::exp(V::load(v + i + W) - sh);
  }
  float s = V::hsum(a + b);
  for (; i < len; ++i) s += exp_scalar(v[i] - shift);
  return s;
}

// The block's sum-exp relative to a +inf max: each +inf counts exp(0) = 1, finite values 0, a NaN makes it NaN
// (torch.logsumexp's +inf for a row with a +inf logit, where exp(inf - inf) would give NaN). A rare path.
TPO_FAST_INLINE float block_sum_exp_at_inf(const float* v, int64_t len) {
  float s = 0.0f;
  for (int64_t i = 0; i < len; ++i) s += v[i] == kPosInf ? 1.0f : (v[i] != v[i] ? v[i] : 0.0f);
  return s;
}

// out[i] = cp * exp(v[i] - l); out may be v.
template <int W>
TPO_FAST_INLINE void block_scaled_exp(const float* v, int64_t len, float l, float cp, float* out) {
  using V = Vec<W>;
  const typename V::F lv = V::splat(l), cv = V::splat(cp);
  int64_t i = 0;
  for (; i + W <= len; i += W) V::store(out + i, cv * V::exp(V::load(v + i) - lv));
  for (; i < len; ++i) out[i] = cp * exp_scalar(v[i] - l);
}

// fp16 <-> fp32 without branches or library calls (the FP16 library's algorithms), so loops vectorise.
TPO_FAST_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

TPO_FAST_INLINE uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// fp32 view of a block: fp32 rows are used in place, half types are converted into buf.
TPO_FAST_INLINE const float* load_block(const float* src, int64_t /*len*/, float* /*buf*/) { return src; }

TPO_FAST_INLINE const float* load_block(const c10::BFloat16* src, int64_t len, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < len; ++i) buf[i] = bits_to_float(static_cast<uint32_t>(bits[i]) << 16);
  return buf;
}

TPO_FAST_INLINE const float* load_block(const c10::Half* src, int64_t len, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < len; ++i) buf[i] = half_to_float(bits[i]);
  return buf;
}

TPO_FAST_INLINE void store_block(const float* src, int64_t len, float* dst) {
  std::memcpy(dst, src, len * sizeof(float));
}

TPO_FAST_INLINE void store_block(const float* src, int64_t len, c10::BFloat16* dst) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t u = float_to_bits(src[i]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    bits[i] = src[i] != src[i] ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

TPO_FAST_INLINE void store_block(const float* src, int64_t len, c10::Half* dst) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < len; ++i) bits[i] = float_to_half(src[i]);
}

struct Rows {
  const void* logits;
  int64_t stride;
  void* grad;
  int64_t grad_stride;
  const int64_t* targets;
  const float* lse_in;
  const float* coef_p;
  const float* coef_y;
  float* lse_out;
  float* z_out;
  int64_t V;
  int64_t ignore_index;
};

template <typename T, int W>
TPO_FAST_INLINE void forward_rows(const Rows& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const int64_t V = a.V;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = a.targets[row];
    if (t == a.ignore_index) {
      a.lse_out[row] = 0.0f;
      a.z_out[row] = 0.0f;
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.stride;
    // 1. online max / sum-exp over blocks; `shift` keeps exp(-inf - -inf) out of rows that are -inf so far
    float m = kNegInf, s = 0.0f;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t len = V - b < kBlock ? V - b : kBlock;
      const float* v = load_block(x + b, len, buf);
      const float bm = block_max<W>(v, len);
      const float m_new = bm > m ? bm : m;
      const float shift = m_new == kNegInf ? 0.0f : m_new;
      if (shift == kPosInf) {
        s = (m == kPosInf ? s : s * 0.0f) + block_sum_exp_at_inf(v, len);  // s * 0 keeps a NaN
      } else {
        s = s * exp_scalar(m - shift) + block_sum_exp<W>(v, len, shift);
      }
      m = m_new;
    }
    // 2. all -inf gives -inf; a +inf logit +inf; a NaN anywhere in the row gives NaN (through s)
    a.lse_out[row] = m + std::log(s);
    a.z_out[row] = (t >= 0 && t < V) ? static_cast<float>(x[t]) : std::numeric_limits<float>::quiet_NaN();
  }
}

template <typename T, int W>
TPO_FAST_INLINE void backward_rows(const Rows& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const int64_t V = a.V;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = a.targets[row];
    T* g = static_cast<T*>(a.grad) + row * a.grad_stride;
    if (t == a.ignore_index) {
      std::memset(static_cast<void*>(g), 0, V * sizeof(T));  // 0.0 is all-zero bits in every dtype
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.stride;
    const float l = a.lse_in[row], cp = a.coef_p[row], cy = a.coef_y[row];
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t len = V - b < kBlock ? V - b : kBlock;
      // The block is read whole before it is written: grad may alias logits (in-place backward).
      if (cp != 0.0f) {
        block_scaled_exp<W>(load_block(x + b, len, buf), len, l, cp, buf);
      } else {
        std::memset(buf, 0, len * sizeof(float));
      }
      // The one-hot term is folded in fp32, before rounding (bf16 `p - 1` would cancel).
      if (t >= b && t < b + len) buf[t - b] += cy;
      store_block(buf, len, g + b);
    }
  }
}

using RowFn = void (*)(const Rows&, int64_t, int64_t);

template <typename T>
void forward_base(const Rows& a, int64_t begin, int64_t end) { forward_rows<T, 4>(a, begin, end); }
template <typename T>
void backward_base(const Rows& a, int64_t begin, int64_t end) { backward_rows<T, 4>(a, begin, end); }

#ifdef TPO_FAST_X86
template <typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const Rows& a, int64_t begin, int64_t end) {
  forward_rows<T, 8>(a, begin, end);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(const Rows& a, int64_t begin, int64_t end) {
  backward_rows<T, 8>(a, begin, end);
}
#endif

// "avx2" on x86-64 CPUs with AVX2 and FMA, else "base"; TPO_FAST_CPU_ISA=base forces the portable path.
int isa_override = -1;  // -1: detect, 0: base, 1: avx2

bool use_avx2() {
#ifdef TPO_FAST_X86
  if (isa_override >= 0) return isa_override == 1;
  static const bool detected = [] {
    const char* env = std::getenv("TPO_FAST_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "base") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return detected;
#else
  return false;
#endif
}

template <typename T>
RowFn pick(bool forward) {
#ifdef TPO_FAST_X86
  if (use_avx2()) return forward ? &forward_avx2<T> : &backward_avx2<T>;
#endif
  return forward ? &forward_base<T> : &backward_base<T>;
}

RowFn pick_for(at::ScalarType dtype, bool forward) {
  switch (dtype) {
    case at::kFloat:
      return pick<float>(forward);
    case at::kBFloat16:
      return pick<c10::BFloat16>(forward);
    case at::kHalf:
      return pick<c10::Half>(forward);
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Enough rows per task that a thread gets >= ~32K logits.
int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace

std::string cpu_isa() { return use_avx2() ? "avx2" : "base"; }

std::string set_cpu_isa(const std::string& isa) {
  if (isa != "auto" && isa != "base" && isa != "avx2") return "isa must be 'auto', 'base' or 'avx2', got " + isa;
  if (isa == "avx2") {
    const int before = isa_override;
    isa_override = -1;
    if (!use_avx2()) {
      isa_override = before;
      return "this CPU (or build) has no AVX2+FMA path";
    }
    isa_override = 1;
  } else {
    isa_override = isa == "base" ? 0 : -1;
  }
  return {};
}

void logits_forward_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                        const at::Tensor& lse, const at::Tensor& target_logit) {
  Rows a{};
  a.logits = logits.const_data_ptr();
  a.stride = logits.stride(0);
  a.targets = targets.const_data_ptr<int64_t>();
  a.lse_out = lse.mutable_data_ptr<float>();
  a.z_out = target_logit.mutable_data_ptr<float>();
  a.V = logits.size(1);
  a.ignore_index = ignore_index;
  const RowFn fn = pick_for(logits.scalar_type(), /*forward=*/true);
  at::parallel_for(0, logits.size(0), grain_for(a.V), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

void logits_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                         const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                         const at::Tensor& grad) {
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), "grad must have the dtype of logits");
  Rows a{};
  a.logits = logits.const_data_ptr();
  a.stride = logits.stride(0);
  a.grad = grad.mutable_data_ptr();  // may be the logits buffer itself
  a.grad_stride = grad.stride(0);
  a.targets = targets.const_data_ptr<int64_t>();
  a.lse_in = lse.const_data_ptr<float>();
  a.coef_p = coef_p.const_data_ptr<float>();
  a.coef_y = coef_y.const_data_ptr<float>();
  a.V = logits.size(1);
  a.ignore_index = ignore_index;
  const RowFn fn = pick_for(logits.scalar_type(), /*forward=*/false);
  at::parallel_for(0, logits.size(0), grain_for(a.V), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

}  // namespace tpo_fast
