// CPU flash attention (fastbig::attention_cpu_fwd / attention_cpu_bwd): the ops, their input
// checks, the task split over OpenMP threads, and the choice of instruction set at load time.
// The math of a tile lives in attention_kernel.h, compiled here twice: for AVX2+FMA+F16C and for
// the baseline the extension is built for (never -march=native: CI's and users' CPUs differ).
// The Python side (fastbig/ops/_attention_cpu.py) holds the fake impls, autograd and the
// measured `auto` table.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FB_ATTN_X86 1
#endif

#include "attention/attention_params.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fastbig {
namespace attn {

#ifdef FB_ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define FB_ATTN_AVX2 1
#include "attention/attention_kernel.h"
#undef FB_ATTN_AVX2
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_base {
#include "attention/attention_kernel.h"
}  // namespace isa_base

namespace {

struct Isa {
  const char* name;
  void (*pack)(const Params&, int64_t, int64_t, int64_t, float*, float*, float*);
  void (*fwd)(const Params&, const float*, const float*, int64_t, int64_t, int64_t, float*);
  void (*decode)(const Params&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*);
  void (*bwd)(const Params&, int64_t, int64_t, int64_t, int64_t, float*, const isa_base::BwdWs&);
};

#ifdef FB_ATTN_X86
// BwdWs is the same struct layout in both namespaces; the AVX2 entry takes the base one.
void bwd_avx2(const Params& p, int64_t b, int64_t hk, int64_t kb0, int64_t kb1, float* dq, const isa_base::BwdWs& w) {
  isa_avx2::BwdWs w2{w.Kt, w.Kr, w.Vt, w.dKa, w.dVa, w.Qh, w.dOh, w.S, w.dP, w.G, w.tmp, w.delta, w.lse};
  isa_avx2::bwd_task(p, b, hk, kb0, kb1, dq, w2);
}
#endif

const Isa kBase{"baseline", &isa_base::pack_kv_block, &isa_base::fwd_task, &isa_base::decode_task,
                &isa_base::bwd_task};
#ifdef FB_ATTN_X86
const Isa kAvx2{"avx2", &isa_avx2::pack_kv_block, &isa_avx2::fwd_task, &isa_avx2::decode_task, &bwd_avx2};
#endif

bool cpu_has_avx2() {
#ifdef FB_ATTN_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
const bool kHasAvx2 = cpu_has_avx2();

// The build that runs: AVX2 when the CPU has it, unless FASTBIG_ATTN_ISA=baseline (tests use it
// to check the baseline build on an AVX2 machine).
const Isa& isa() {
  const char* env = std::getenv("FASTBIG_ATTN_ISA");
  const bool base = env && std::string(env) == "baseline";
#ifdef FB_ATTN_X86
  if (kHasAvx2 && !base) return kAvx2;
#endif
  (void)base;
  return kBase;
}

int threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// Runs f(task, workspace) for task in [0, n) over nt OpenMP threads, dynamically scheduled
// (causal tiles differ in cost), each thread with its own ws_floats workspace.
template <typename F>
void parallel_tasks(int64_t n, int nt, size_t ws_floats, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  if (nt > 1 && n > 1) {
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(nt, n)))
    {
      std::vector<float> ws(ws_floats + 16);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < n; ++t) f(t, ws.data());
    }
    return;
  }
#endif
  std::vector<float> ws(ws_floats + 16);
  for (int64_t t = 0; t < n; ++t) f(t, ws.data());
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, "attention_cpu: q must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

at::Tensor inner_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One [B, H, S, D] operand into Params: its data and its B, H and S element strides (a copy with
// unit D stride where it has none, kept alive in keep).
void set_operand(std::vector<at::Tensor>& keep, const at::Tensor& t, const void*& data, int64_t& sb, int64_t& sh,
                 int64_t& ss) {
  at::Tensor c = inner_contig(t);
  keep.push_back(c);
  data = c.data_ptr();
  sb = c.stride(0);
  sh = c.stride(1);
  ss = c.stride(2);
}

// Fills the parts of Params shared by the forward and the backward; returns the tensors that keep
// converted copies alive.
std::vector<at::Tensor> fill_params(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const c10::optional<at::Tensor>& attn_mask,
                                    const c10::optional<at::Tensor>& key_padding_mask,
                                    const c10::optional<at::Tensor>& sinks,
                                    const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                    int64_t window_left, int64_t window_right, bool bottom_right) {
  const char* op = "attention_cpu";
  const std::pair<const char*, const at::Tensor*> qkv[3] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& pr : qkv) {
    TORCH_CHECK(pr.second->device().is_cpu(), op, ": ", pr.first, " must be a CPU tensor, got ",
                pr.second->device());
    TORCH_CHECK(pr.second->dim() == 4, op, ": ", pr.first, " must be 4-D [B, H, S, D], got ", pr.second->dim(),
                "-D");
    TORCH_CHECK(pr.second->scalar_type() == q.scalar_type(), op, ": ", pr.first, " must have q's dtype ",
                q.scalar_type(), ", got ", pr.second->scalar_type());
  }
  std::vector<at::Tensor> keep;
  p.dtype = dtype_code(q);
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Sk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(0) == p.B, op, ": k must have batch ", p.B, " (q's), got ", k.size(0));
  TORCH_CHECK(k.size(3) == p.D, op, ": k must have head dim ", p.D, " (q's), got ", k.size(3));
  TORCH_CHECK(p.D > 0, op, ": the head dim must be positive, got ", p.D);
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, op, ": Hq must be a multiple of Hkv, got Hq=", p.Hq,
              " and Hkv=", p.Hkv);
  p.Dp = (p.D + 15) / 16 * 16;
  set_operand(keep, q, p.q, p.q_sb, p.q_sh, p.q_ss);
  set_operand(keep, k, p.k, p.k_sb, p.k_sh, p.k_ss);
  set_operand(keep, v, p.v, p.v_sb, p.v_sh, p.v_ss);
  p.scale = float(scale);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0 (0 = off), got ", softcap);
  p.softcap = float(softcap);
  p.wl = window_left < 0 ? -1 : window_left;
  p.wr = window_right < 0 ? -1 : window_right;
  p.off = bottom_right ? p.Sk - p.Sq : 0;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Sk, op,
                ": key_padding_mask must have shape [B, Sk] = [", p.B, ", ", p.Sk, "], got ", m.sizes());
    at::Tensor mc = m.contiguous();
    keep.push_back(mc);
    p.kpm = reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>());
  }
  if (attn_mask.has_value()) {
    at::Tensor m = *attn_mask;
    TORCH_CHECK(m.dim() >= 2 && m.dim() <= 4, op, ": attn_mask must be 2-D to 4-D, got ", m.dim(), "-D");
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be bool or floating, got ", m.scalar_type());
    if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
    const std::vector<int64_t> full{p.B, p.Hq, p.Sq, p.Sk};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t fd = full[4 - m.dim() + d], md = m.size(d);
      TORCH_CHECK(md == 1 || md == fd, op, ": attn_mask must be broadcastable to [B, Hq, Sq, Sk] = ", full,
                  ", got ", m.sizes());
    }
    m = m.expand(full);  // broadcast dims get stride 0
    keep.push_back(m);
    p.mask_kind = m.scalar_type() == at::kBool ? kBoolMask : kAddMask;
    p.mask = m.data_ptr();
    p.m_sb = m.stride(0);
    p.m_sh = m.stride(1);
    p.m_sq = m.stride(2);
    p.m_sk = m.stride(3);
  }
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == p.Hq, op, ": sinks must have shape [Hq] = [", p.Hq, "], got ",
                s.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), op, ": sinks must be floating, got ", s.scalar_type());
    at::Tensor sc = s.to(at::kFloat).contiguous();
    keep.push_back(sc);
    p.sinks = sc.data_ptr<float>();
  }
  if (alibi_slopes.has_value()) {
    at::Tensor a = *alibi_slopes;
    TORCH_CHECK((a.dim() == 1 && a.size(0) == p.Hq) || (a.dim() == 2 && a.size(0) == p.B && a.size(1) == p.Hq),
                op, ": alibi_slopes must have shape [Hq] or [B, Hq], got ", a.sizes());
    a = a.to(at::kFloat).contiguous();
    keep.push_back(a);
    p.alibi = a.data_ptr<float>();
    p.al_sb = a.dim() == 2 ? p.Hq : 0;
    p.al_sh = 1;
  }
  return keep;
}

// Query rows at most this many use the decode path (one pass over K/V per kv-head group).
constexpr int64_t kDecodeMaxSq = 8;

void run_decode(const Params& p, const Isa& is, int nt) {
  const int64_t G = p.group(), R = G * p.Sq, groups = p.B * p.Hkv, Dp = p.Dp;
  const int64_t klo = p.row_lo(0), khi = std::max(p.row_hi(p.Sq - 1), klo);
  const int64_t span = khi - klo;
  int64_t nsplit = 1;
  if (groups < 4 * nt) nsplit = std::min<int64_t>((4 * nt + groups - 1) / groups, std::max<int64_t>(1, span / 256));
  const int64_t per = R * (2 + Dp);
  std::vector<float> part(size_t(groups * nsplit * per));
  const size_t ws = size_t(R * p.D + R * BKD + Dp);
  parallel_tasks(groups * nsplit, nt, ws, [&](int64_t t, float* w) {
    const int64_t g = t / nsplit, s = t % nsplit;
    const int64_t ks = klo + span * s / nsplit, ke = klo + span * (s + 1) / nsplit;
    float* base = part.data() + t * per;
    is.decode(p, g / p.Hkv, g % p.Hkv, ks, ke, base, base + R, base + 2 * R, w);
  });
  // merge the splits by log-sum-exp, then normalize (cheap: serial, no second parallel region)
  {
    const int64_t g0 = 0, g1 = groups;
    std::vector<float> acc(static_cast<size_t>(Dp));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / p.Hkv, hk = g % p.Hkv;
      for (int64_t r = 0; r < R; ++r) {
        float M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) M = std::max(M, part[size_t((g * nsplit + s) * per + r)]);
        float L = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < nsplit; ++s) {
          const float* base = part.data() + (g * nsplit + s) * per;
          const float m = base[r], l = base[R + r];
          if (m == kNegInf) continue;
          const float f = M == m ? 1.f : std::exp(m - M);
          L += l * f;
          const float* a = base + 2 * R + r * Dp;
          for (int64_t d = 0; d < Dp; ++d) acc[size_t(d)] += a[d] * f;
        }
        if (nsplit == 1) {  // M is m: keep NaN m / l as they are
          const float* base = part.data() + g * per;
          M = base[r];
          L = base[R + r];
        }
        const int64_t h = hk * G + r / p.Sq, i = r % p.Sq;
        const int64_t row = (b * p.Hq + h) * p.Sq + i;
        isa_base::finish_row(p, h, M, L, acc.data(), p.out + row * p.D, p.lse + row);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& attn_mask,
                                                     const c10::optional<at::Tensor>& key_padding_mask,
                                                     const c10::optional<at::Tensor>& sinks,
                                                     const c10::optional<at::Tensor>& alibi_slopes, double scale,
                                                     double softcap, int64_t window_left, int64_t window_right,
                                                     bool bottom_right) {
  Params p;
  auto keep = fill_params(p, q, k, v, attn_mask, key_padding_mask, sinks, alibi_slopes, scale, softcap,
                          window_left, window_right, bottom_right);
  at::Tensor out = at::empty({p.B, p.Hq, p.Sq, p.D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  const Isa& is = isa();
  const int nt = threads();
  if (p.B * p.Hq * p.Sq > 0) {
    if (p.Sq <= kDecodeMaxSq) {
      run_decode(p, is, nt);
    } else {
      const int64_t nkb = p.nkb(), nqb = (p.Sq + BQ - 1) / BQ, G = p.group();
      const int64_t kv_blocks = p.B * p.Hkv * nkb, kblk = p.D * BK, vblk = BK * p.Dp;
      const size_t ws = size_t(BQ * p.D + BQ * BK + BQ * p.Dp + 2 * BQ);
      if (p.B * p.Hkv >= 4 * nt) {
        // one task per (b, kv head): it packs its own K/V blocks and runs all its query blocks,
        // one parallel region and no barrier (a barrier costs a scheduler slice on a busy machine)
        parallel_tasks(p.B * p.Hkv, nt, ws + size_t(nkb * (kblk + vblk) + p.Dp), [&](int64_t t, float* w) {
          float* Kl = w + ws;
          float* Vl = Kl + nkb * kblk;
          float* tmp = Vl + nkb * vblk;
          const int64_t b = t / p.Hkv, hk = t % p.Hkv;
          for (int64_t kb = 0; kb < nkb; ++kb) is.pack(p, b, hk, kb, Kl + kb * kblk, Vl + kb * vblk, tmp);
          for (int64_t g = 0; g < G; ++g)
            for (int64_t qb = 0; qb < nqb; ++qb) is.fwd(p, Kl, Vl, b, hk * G + g, qb, w);
        });
      } else {
        std::vector<float> Kp(size_t(kv_blocks * kblk)), Vp(size_t(kv_blocks * vblk));
        parallel_tasks(kv_blocks, nt, size_t(p.Dp), [&](int64_t t, float* w) {
          const int64_t kb = t % nkb, bh = t / nkb;
          is.pack(p, bh / p.Hkv, bh % p.Hkv, kb, Kp.data() + t * kblk, Vp.data() + t * vblk, w);
        });
        parallel_tasks(p.B * p.Hq * nqb, nt, ws, [&](int64_t t, float* w) {
          const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb;  // the costliest causal tiles first
          const int64_t b = bh / p.Hq, h = bh % p.Hq, off = (b * p.Hkv + h / G) * nkb;
          is.fwd(p, Kp.data() + off * kblk, Vp.data() + off * vblk, b, h, qb, w);
        });
      }
    }
  }
  const at::ScalarType dt = q.scalar_type();
  return {dt == at::kFloat ? out : out.to(dt), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cpu_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& sinks,
    const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t window_left,
    int64_t window_right, bool bottom_right, bool mask_grad) {
  Params p;
  auto keep = fill_params(p, q, k, v, attn_mask, key_padding_mask, sinks, alibi_slopes, scale, softcap,
                          window_left, window_right, bottom_right);
  const char* op = "attention_cpu_bwd";
  const std::pair<const char*, const at::Tensor*> go[2] = {{"grad_out", &grad_out}, {"out", &out}};
  for (const auto& pr : go) {
    TORCH_CHECK(pr.second->sizes() == q.sizes(), op, ": ", pr.first, " must have q's shape ", q.sizes(), ", got ",
                pr.second->sizes());
    TORCH_CHECK(pr.second->scalar_type() == q.scalar_type(), op, ": ", pr.first, " must have q's dtype ",
                q.scalar_type(), ", got ", pr.second->scalar_type());
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
                  lse.size(2) == p.Sq,
              op, ": lse must be float32 [B, Hq, Sq], got ", lse.scalar_type(), " ", lse.sizes());
  set_operand(keep, grad_out, p.dout, p.do_sb, p.do_sh, p.do_ss);
  set_operand(keep, out, p.o, p.o_sb, p.o_sh, p.o_ss);
  at::Tensor lc = lse.contiguous();
  keep.push_back(lc);
  p.lse_in = lc.data_ptr<float>();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({p.B, p.Hq, p.Sq, p.D}, f32);
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Sk, p.D}, f32);
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Sk, p.D}, f32);
  at::Tensor delta = at::empty({p.B, p.Hq, p.Sq}, f32);
  at::Tensor dmask = at::empty({0}, f32);
  if (mask_grad && p.mask_kind == kAddMask) {
    dmask = at::zeros({p.B, p.Hq, p.Sq, p.Sk}, f32);
    p.dmask = dmask.data_ptr<float>();
  }
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  const Isa& is = isa();
  const int nt = threads();
  const int64_t G = p.group(), groups = p.B * p.Hkv, nkb = p.nkb(), Dp = p.Dp, D = p.D, Sq = p.Sq;
  int64_t nsplit = 1;  // key-block ranges per (b, kv head); each has its own dQ partial
  if (groups < 2 * nt && nkb > 1) nsplit = std::min<int64_t>(nkb, (2 * nt + groups - 1) / groups);
  const int64_t nkt_max = nsplit == 0 ? 0 : (nkb + nsplit - 1) / nsplit;
  const int64_t dq_per = G * Sq * Dp;
  std::vector<float> dqp(size_t(groups * nsplit * dq_per));
  const size_t ws = size_t(2 * nkt_max * D * BK + 3 * nkt_max * BK * Dp + 2 * Sq * Dp + 3 * BQ * BK + Dp + 2 * Sq);
  if (groups > 0) {
    parallel_tasks(groups * nsplit, nt, ws, [&](int64_t t, float* w) {
      const int64_t g = t / nsplit, s = t % nsplit;
      const int64_t kb0 = nkb * s / nsplit, kb1 = nkb * (s + 1) / nsplit;
      isa_base::BwdWs bw;
      float* x = w;
      bw.Kt = x; x += nkt_max * D * BK;
      bw.Vt = x; x += nkt_max * D * BK;
      bw.Kr = x; x += nkt_max * BK * Dp;
      bw.dKa = x; x += nkt_max * BK * Dp;
      bw.dVa = x; x += nkt_max * BK * Dp;
      bw.Qh = x; x += Sq * Dp;
      bw.dOh = x; x += Sq * Dp;
      bw.S = x; x += BQ * BK;
      bw.dP = x; x += BQ * BK;
      bw.G = x; x += BQ * BK;
      bw.tmp = x; x += Dp;
      bw.delta = x; x += Sq;
      bw.lse = x;
      is.bwd(p, g / p.Hkv, g % p.Hkv, kb0, kb1, dqp.data() + t * dq_per, bw);
    });
  }
  // dq = scale * sum over the splits (in split order: deterministic)
  const float sc = p.scale;
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t bh = r0; bh < r1; ++bh) {
      const int64_t b = bh / p.Hq, h = bh % p.Hq, g = b * p.Hkv + h / G, gi = h % G;
      for (int64_t i = 0; i < Sq; ++i) {
        float* dst = p.dq + (bh * Sq + i) * D;
        for (int64_t d = 0; d < D; ++d) {
          float a = 0.f;
          for (int64_t s = 0; s < nsplit; ++s) a += dqp[size_t((g * nsplit + s) * dq_per + (gi * Sq + i) * Dp + d)];
          dst[d] = a * sc;
        }
      }
    }
  });
  const at::ScalarType dt = q.scalar_type();
  if (dt != at::kFloat) {
    dq = dq.to(dt);
    dk = dk.to(dt);
    dv = dv.to(dt);
  }
  return {dq, dk, dv, dmask, delta};
}

}  // namespace
}  // namespace attn
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("attention_cpu_fwd", &fastbig::attn::attention_cpu_fwd);
  m.impl("attention_cpu_bwd", &fastbig::attn::attention_cpu_bwd);
}
