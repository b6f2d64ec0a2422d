// The autoregressive stacked-LSTM recurrence of seqgen/model/recurrence.py, with its time loop in C++.
//
// Why: scheduled sampling makes every step's input depend on the previous step's output, so the
// T-step loop cannot be batched over time. In Python each layer-step costs ~20 small ATen ops
// (dispatch, allocation, one pass over memory each). Here each layer-step is one GEMM, left to
// ATen (MKL for float, oneDNN for bfloat16), and one pass over the batch rows that does all the
// gate math in registers, vectorised by the compiler.
//
// Members: every tensor has a leading dimension M of independent models of one shape (chains of
// a study trained as one stacked model). Each member's data is contiguous, and a member's whole
// time loop runs on one thread where there are at least as many members as threads; otherwise
// members run one after another with their rows split over the threads (for_members).
//
// Shapes per member: T steps, B rows, L layers, H hidden, G = 4H gates in the order [i, f, o, g],
// K outputs, F layer-0 features. Layer l's GEMM input at step t is one row block A[l][t] =
// [x_t, h_{t-1}] (layer 0: h_{t-1} only) and its weight is W[l] = [w_ih; w_hh], so each
// layer-step is a single (B, I + H) x (I + H, G) GEMM, and the weight gradient of a whole
// sequence is a single (I + H, T*B) x (T*B, G) GEMM over the saved A[l]. Layer 0's narrow inputs
// (F features and the K fed-back values) are added in the gate pass: F + K axpys per row instead
// of a (T, B, G) tensor of pre-activations written and read through memory.
//
// Precision: acc_t (float, or double for gradcheck) for states, gate math and gradients; mm_t
// (acc_t, or bfloat16 under mixed precision) for the H-wide GEMM operands, as the Python path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace {

using at::Tensor;

// ---- numbers -----------------------------------------------------------------------------------

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(at::BFloat16 v) {  // bfloat16 is the top half of a float
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename mm_t, typename acc_t>
inline mm_t narrow(acc_t v) {
  if constexpr (std::is_same_v<mm_t, at::BFloat16>) {
    return at::BFloat16(v);  // round to nearest even, as Tensor.to(torch.bfloat16)
  } else {
    return v;
  }
}

// tanh as a 13/6 rational function (Eigen's fast float tanh; max abs error 3.4e-7 against 3e-8
// for torch.tanh): plain arithmetic, so gcc vectorises the loops that use it, where a libm call
// keeps them scalar. NaN stays NaN, so the trainer still sees a diverging step.
inline float tanh_(float a) {
  const float x = std::clamp(a, -7.90531110763549805f, 7.90531110763549805f);
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}
inline float sigmoid_(float x) { return 0.5f * tanh_(0.5f * x) + 0.5f; }
// double is for gradcheck only: exact functions, speed does not matter.
inline double tanh_(double x) { return std::tanh(x); }
inline double sigmoid_(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Rows per task: enough gate elements that a thread's share outweighs waking it.
inline int64_t grain(int64_t G) { return std::max<int64_t>(1, 16384 / G); }

// ---- memory ------------------------------------------------------------------------------------

// The saved activations and gradients of one training step are ~120 MB per member (full model).
// Fresh from the OS every step, their page faults and zeroing took about a third of the step; so
// the large buffers come from a cache of freed blocks, reused by size. The cache is never
// destroyed (a tensor may give its block back during exit) and holds at most 4 GiB: a step's
// buffers for 15 stacked members, and those of a second batch size (an epoch's last batch). With
// 1 GiB, 9 stacked members trained at 0.8x the speed of 9 separate calls.
class BlockCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TORCH_CHECK(block, "seqgen native recurrence: out of memory for ", bytes, " bytes");
    return block;
  }
  void give(void* block, size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (cached_ + bytes > kMaxBytes) return std::free(block);
    free_.emplace(bytes, block);
    cached_ += bytes;
  }

 private:
  static constexpr size_t kMaxBytes = size_t(4) << 30;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// at::empty(sizes, options) on a block from the cache, which gets it back when the tensor dies.
Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static BlockCache* cache = new BlockCache();
  size_t bytes = options.dtype().itemsize();
  for (const int64_t n : sizes) bytes *= size_t(n);
  bytes = std::max<size_t>(bytes, 1);
  return at::from_blob(
      cache->take(bytes), sizes, [bytes](void* p) { cache->give(p, bytes); }, options);
}

// ---- sizes, weights, members -------------------------------------------------------------------

struct Dims {
  int64_t M, T, B, H, G, K, F, L;
  int64_t in(int64_t l) const { return l == 0 ? 0 : H; }  // width of x in A[l] = [x, h]
  int64_t width(int64_t l) const { return in(l) + H; }
};

// layer_w = (w_hh_0, w_ih_1, w_hh_1, b_1, ...), each (M, ...) -> W[l] = [w_ih_l; w_hh_l]
// (M, I + H, G) in mm dtype.
std::vector<Tensor> gemm_weights(at::TensorList layer_w, int64_t L, at::ScalarType mm) {
  std::vector<Tensor> W{layer_w[0].to(mm).contiguous()};
  for (int64_t l = 1; l < L; ++l) {
    W.push_back(at::cat({layer_w[3 * l - 2], layer_w[3 * l - 1]}, 1).to(mm).contiguous());
  }
  return W;
}

// Member m's part of a member-first tensor (null where x is undefined).
template <typename T>
inline T* member_ptr(const Tensor& x, int64_t m) {
  return x.defined() ? x.data_ptr<T>() + m * x.stride(0) : nullptr;
}

// run(m, split_rows) for every member m. Members are independent models, so where there are at
// least as many as threads each thread runs whole members, GEMMs and gate math, like chains side
// by side (1.6x the throughput of threads splitting one small GEMM, FACTS.md): as many members
// per thread as divide evenly; the members left over (fewer than the threads) then run one after
// another with their rows (and their GEMMs) split over the threads.
template <typename F>
void for_members(int64_t M, const F& run) {
  const int64_t threads = at::get_num_threads();
  const int64_t whole = M > 1 ? M / threads * threads : 0;  // run whole on one thread each
  if (whole > 0) {
    // ATen calls on the worker threads need the caller's thread-local state: grad mode off (a
    // GEMM weight may be the caller's leaf tensor itself), dispatch keys, the profiler
    const at::ThreadLocalState caller;
    at::parallel_for(0, whole, 1, [&](int64_t m0, int64_t m1) {
      const at::ThreadLocalStateGuard guard(caller);
      for (int64_t m = m0; m < m1; ++m) run(m, false);
    });
  }
  for (int64_t m = whole; m < M; ++m) run(m, true);
}

// rows(b0, b1) over one member's B rows: split over the threads, or all on this one.
template <typename F>
void over_rows(int64_t B, int64_t G, bool split, const F& rows) {
  if (split) {
    at::parallel_for(0, B, grain(G), rows);
  } else {
    rows(0, B);
  }
}

// out = a @ b; through a temporary where out has another dtype than the GEMM (bfloat16 GEMMs).
void mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(at::mm(a, b));
  }
}

// ---- forward -----------------------------------------------------------------------------------
// (Each row loop sits in a small function: its __restrict parameters let gcc vectorise it.)

// Layer 0's gate input besides its GEMM, one row: b_x + x0 @ w_x + y_in @ w_y (F + K axpys).
template <typename acc_t>
inline void layer0_input(const acc_t* __restrict b_x, const acc_t* __restrict x0,
                         const acc_t* __restrict w_x, const acc_t* __restrict y_in,
                         const acc_t* __restrict w_y, acc_t* __restrict out, const Dims& d) {
  const int64_t G = d.G;
  for (int64_t j = 0; j < G; ++j) out[j] = b_x[j];
  for (int64_t f = 0; f < d.F; ++f) {
    for (int64_t j = 0; j < G; ++j) out[j] += x0[f] * w_x[f * G + j];
  }
  for (int64_t k = 0; k < d.K; ++k) {
    for (int64_t j = 0; j < G; ++j) out[j] += y_in[k] * w_y[k * G + j];
  }
}

// One row of one layer-step in one pass: pre-activations gemm + pre (G) -> activations
// a = [i, f, o, g] (G), and with c_prev (H) -> c, tanh(c), h (H). Generation keeps no a, tanh(c).
template <bool save, typename acc_t, typename mm_t>
inline void cell_forward(const mm_t* __restrict gemm, const acc_t* __restrict pre,
                         const acc_t* __restrict c_prev, acc_t* __restrict a, acc_t* __restrict c,
                         acc_t* __restrict tc, acc_t* __restrict h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const acc_t i = sigmoid_(widen(gemm[j]) + pre[j]);
    const acc_t f = sigmoid_(widen(gemm[H + j]) + pre[H + j]);
    const acc_t o = sigmoid_(widen(gemm[2 * H + j]) + pre[2 * H + j]);
    const acc_t g = tanh_(widen(gemm[3 * H + j]) + pre[3 * H + j]);
    const acc_t cj = f * c_prev[j] + i * g, tcj = tanh_(cj);
    c[j] = cj, h[j] = o * tcj;
    if constexpr (save) a[j] = i, a[H + j] = f, a[2 * H + j] = o, a[3 * H + j] = g, tc[j] = tcj;
  }
}

// h (H) into the next GEMM inputs: as is, or times a dropout keep-mask.
template <typename acc_t, typename mm_t>
inline void store_h(const acc_t* __restrict h, const acc_t* __restrict mask, mm_t* __restrict out,
                    int64_t H) {
  if (mask) {
    for (int64_t j = 0; j < H; ++j) out[j] = narrow<mm_t>(h[j] * mask[j]);
  } else {
    for (int64_t j = 0; j < H; ++j) out[j] = narrow<mm_t>(h[j]);
  }
}

// Pointers of one layer-step's gate pass; row b of a (B, n) block starts at b * n.
template <typename acc_t, typename mm_t>
struct ForwardStep {
  const mm_t* gemm;      // (B, G) A[l][t] @ W[l]
  const acc_t* bias;     // (G) b_x for layer 0, b_l for layer l >= 1
  const acc_t *x0, *w_x, *y_in, *w_y;  // layer 0: x0[t] (B, F), fed-back value (B, K), weights
  acc_t* pre;            // layer 0: scratch (B, G) for its full gate input
  const acc_t* c_prev;   // (B, H)
  acc_t *act, *c, *tc;   // out: activations (B, G) or null, cell state, its tanh or null (B, H)
  acc_t* h;              // out: hidden state (B, H)
  mm_t* h_next;          // out: h into A[l][t+1] (row stride width(l)); null at the last step
  mm_t* x_up;            // out: h * drop into A[l+1][t] (row stride 2H); null for the top layer
  const acc_t* drop;     // (B, H) keep-mask on the layer above's input, or null
};

template <typename acc_t, typename mm_t>
void gates_forward_rows(const ForwardStep<acc_t, mm_t>& s, const Dims& d, int64_t l, int64_t b0,
                        int64_t b1) {
  const int64_t H = d.H, G = d.G;
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t* pre = s.bias;
    if (l == 0) {
      layer0_input(s.bias, s.x0 + b * d.F, s.w_x, s.y_in + b * d.K, s.w_y, s.pre + b * G, d);
      pre = s.pre + b * G;
    }
    if (s.act) {
      cell_forward<true>(s.gemm + b * G, pre, s.c_prev + b * H, s.act + b * G, s.c + b * H,
                         s.tc + b * H, s.h + b * H, H);
    } else {
      cell_forward<false>(s.gemm + b * G, pre, s.c_prev + b * H, s.act, s.c + b * H, s.tc,
                          s.h + b * H, H);
    }
    if (s.h_next) store_h<acc_t, mm_t>(s.h + b * H, nullptr, s.h_next + b * d.width(l), H);
    if (s.x_up) {
      store_h(s.h + b * H, s.drop ? s.drop + b * H : nullptr, s.x_up + b * 2 * H, H);
    }
  }
}

// The head on the top layer's h, and the next step's layer-0 input: the truth where use_truth
// is 1, the model's own output where it is 0 (torch.lerp's formula, as the Python path).
template <typename acc_t>
void head_rows(const acc_t* h, const acc_t* w_out_t, const acc_t* b_out, acc_t* y_hat,
               const acc_t* y_teacher_next, const acc_t* use_truth_next, acc_t* y_in_next,
               const Dims& d, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t* __restrict hb = h + b * d.H;
    for (int64_t k = 0; k < d.K; ++k) {
      const acc_t* __restrict w = w_out_t + k * d.H;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)  // lets the compiler reorder the sum, so it vectorises
      for (int64_t j = 0; j < d.H; ++j) sum += hb[j] * w[j];
      y_hat[b * d.K + k] = sum + b_out[k];
    }
    if (!y_in_next) continue;
    const acc_t u = use_truth_next[b];
    for (int64_t k = 0; k < d.K; ++k) {
      const acc_t y = y_hat[b * d.K + k], truth = y_teacher_next[b * d.K + k];
      y_in_next[b * d.K + k] = u < 0.5 ? y + u * (truth - y) : truth - (truth - y) * (1 - u);
    }
  }
}

// Every tensor of one forward, member first; `member` runs one member's whole time loop.
template <typename acc_t, typename mm_t>
struct Forward {
  Dims d;
  int64_t S;  // steps kept: all T for the backward, a ring of two for generation
  // inputs: x0, w_x, b_x, y_teacher, use_truth, c0, w_y, w_out^T (M, K, H), b_out, drop, and
  // the bias b_l of each layer l >= 1 (undefined for layer 0)
  Tensor x0, w_x, b_x, y_teacher, use_truth, c0, w_y, w_out_t, b_out, drop;
  std::vector<Tensor> bias;
  std::vector<Tensor> W, A;  // W[l] (M, width, G); GEMM inputs A[l] (M, S, B, width)
  // activations (M, L, T, B, G) and tanh(c) (M, L, T, B, H) for the backward only (else
  // undefined); C (M, L, S, B, H), Htop (M, S, B, H), Y_in (M, S, B, K), y_hat (M, T, B, K)
  Tensor act, TC, C, Htop, Y_in, y_hat;
  Tensor gm, pre, h_mid;  // scratch per member: GEMM out (M, B, G), layer 0's input, h (M, B, H)

  void member(int64_t m, bool split) const {
    const int64_t T = d.T, B = d.B, H = d.H, G = d.G, K = d.K, L = d.L;
    const auto ptr = [m](const Tensor& x) { return member_ptr<acc_t>(x, m); };
    std::vector<std::vector<Tensor>> A_step;  // per-step views, made once: the loop makes none
    std::vector<Tensor> W_m;
    for (int64_t l = 0; l < L; ++l) {
      A_step.push_back(A[l].select(0, m).unbind(0));
      W_m.push_back(W[l].select(0, m));
    }
    Tensor gm_m = gm.select(0, m);
    const acc_t *wo = ptr(w_out_t), *bo = ptr(b_out), *yt = ptr(y_teacher), *ut = ptr(use_truth);
    const acc_t *dr = ptr(drop), *c0p = ptr(c0), *x0p = ptr(x0);
    acc_t *actp = ptr(act), *Cp = ptr(C), *TCp = ptr(TC), *Htp = ptr(Htop), *Yp = ptr(Y_in);
    acc_t* yh = ptr(y_hat);

    for (int64_t t = 0; t < T; ++t) {
      const int64_t now = t % S, next = (t + 1) % S, prev = (t + S - 1) % S;
      const bool more = t + 1 < T;
      for (int64_t l = 0; l < L; ++l) {
        at::mm_out(gm_m, A_step[l][now], W_m[l]);
        const bool top = l == L - 1;
        mm_t* A_m = member_ptr<mm_t>(A[l], m);
        ForwardStep<acc_t, mm_t> s{};
        s.gemm = gm_m.data_ptr<mm_t>();
        s.bias = l == 0 ? ptr(b_x) : ptr(bias[l]);
        s.x0 = x0p + t * B * d.F, s.w_x = ptr(w_x), s.y_in = Yp + now * B * K, s.w_y = ptr(w_y);
        s.pre = ptr(pre);
        s.c_prev = t == 0 ? c0p + l * B * H : Cp + (l * S + prev) * B * H;
        s.act = actp ? actp + (l * T + t) * B * G : nullptr;
        s.c = Cp + (l * S + now) * B * H;
        s.tc = TCp ? TCp + (l * T + t) * B * H : nullptr;
        s.h = top ? Htp + now * B * H : ptr(h_mid);
        s.h_next = more ? A_m + next * B * d.width(l) + d.in(l) : nullptr;
        s.x_up = top ? nullptr : member_ptr<mm_t>(A[l + 1], m) + now * B * 2 * H;
        s.drop = dr && !top ? dr + (l * T + t) * B * H : nullptr;
        over_rows(B, G, split, [&](int64_t b0, int64_t b1) {
          gates_forward_rows(s, d, l, b0, b1);
          if (top) {
            head_rows(s.h, wo, bo, yh + t * B * K, more ? yt + (t + 1) * B * K : nullptr,
                      more ? ut + (t + 1) * B : nullptr, more ? Yp + next * B * K : nullptr, d,
                      b0, b1);
          }
        });
      }
    }
  }
};

template <typename acc_t, typename mm_t>
std::vector<Tensor> forward_impl(const Dims& d, const Tensor& x0, const Tensor& w_x,
                                 const Tensor& b_x, const Tensor& y_teacher,
                                 const Tensor& use_truth, const Tensor& h0, const Tensor& c0,
                                 const std::optional<Tensor>& drop, const Tensor& w_y,
                                 const Tensor& w_out, const Tensor& b_out, at::TensorList layer_w,
                                 at::ScalarType mm, bool save) {
  const int64_t M = d.M, T = d.T, B = d.B, H = d.H, G = d.G, K = d.K, L = d.L;
  const auto acc = x0.options(), low = acc.dtype(mm);
  Forward<acc_t, mm_t> f{d, save ? T : 2, x0, w_x, b_x, y_teacher, use_truth, c0, w_y};
  f.w_out_t = w_out.transpose(1, 2).contiguous();
  f.b_out = b_out;
  f.drop = drop ? *drop : Tensor();
  f.bias.push_back(Tensor());
  for (int64_t l = 1; l < L; ++l) f.bias.push_back(layer_w[3 * l]);
  f.W = gemm_weights(layer_w, L, mm);
  for (int64_t l = 0; l < L; ++l) {
    f.A.push_back(buffer({M, f.S, B, d.width(l)}, low));
    f.A[l].select(1, 0).narrow(2, d.in(l), H).copy_(h0.select(1, l));
  }
  // activations and tanh(c) only for the backward; generation needs just c and h
  if (save) f.act = buffer({M, L, T, B, G}, acc), f.TC = buffer({M, L, T, B, H}, acc);
  f.C = buffer({M, L, f.S, B, H}, acc), f.Htop = buffer({M, f.S, B, H}, acc);
  f.Y_in = buffer({M, f.S, B, K}, acc), f.y_hat = at::empty({M, T, B, K}, acc);
  f.gm = at::empty({M, B, G}, low), f.pre = at::empty({M, B, G}, acc);
  f.h_mid = at::empty({M, B, H}, acc);
  f.Y_in.select(1, 0).copy_(y_teacher.select(1, 0));
  for_members(M, [&](int64_t m, bool split) { f.member(m, split); });
  if (!save) return {f.y_hat};
  std::vector<Tensor> out{f.y_hat, f.act, f.C, f.TC, f.Htop, f.Y_in};
  out.insert(out.end(), f.A.begin(), f.A.end());
  out.insert(out.end(), f.W.begin(), f.W.end());
  return out;
}

// ---- backward ----------------------------------------------------------------------------------

// One row: saved activations a (G), c_prev, tanh(c) and the incoming dL/dh (H); dc (H) carries
// dL/dc back through the forget gate. Writes the gate gradients dg (G).
template <typename acc_t>
inline void cell_backward(const acc_t* __restrict a, const acc_t* __restrict c_prev,
                          const acc_t* __restrict tc, const acc_t* __restrict dh,
                          acc_t* __restrict dc, acc_t* __restrict dg, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const acc_t i = a[j], f = a[H + j], o = a[2 * H + j], g = a[3 * H + j];
    const acc_t dcj = dc[j] + dh[j] * o * (1 - tc[j] * tc[j]);
    dc[j] = dcj * f;
    // through sigmoid' = s (1 - s) for i, f, o and tanh' = 1 - g^2 for g
    dg[j] = dcj * g * i * (1 - i);
    dg[H + j] = dcj * c_prev[j] * f * (1 - f);
    dg[2 * H + j] = dh[j] * tc[j] * o * (1 - o);
    dg[3 * H + j] = dcj * i * (1 - g * g);
  }
}

// dL/dh of one row (H): from the next step's GEMM, plus from the head (top layer) or from the
// layer above through its input dropout.
template <typename acc_t, typename mm_t>
inline void gather_dh(const mm_t* __restrict rec, const mm_t* __restrict up,
                      const acc_t* __restrict mask, const acc_t* __restrict d_out,
                      const acc_t* __restrict w_out_t, acc_t* __restrict dh, const Dims& d) {
  const int64_t H = d.H;
  for (int64_t j = 0; j < H; ++j) dh[j] = widen(rec[j]);
  if (d_out) {
    for (int64_t k = 0; k < d.K; ++k) {
      for (int64_t j = 0; j < H; ++j) dh[j] += d_out[k] * w_out_t[k * H + j];
    }
  } else if (mask) {
    for (int64_t j = 0; j < H; ++j) dh[j] += widen(up[j]) * mask[j];
  } else {
    for (int64_t j = 0; j < H; ++j) dh[j] += widen(up[j]);
  }
}

// The gate gradients dg (G) of one row into the GEMM operand and the running bias gradient.
template <typename acc_t, typename mm_t>
inline void store_dg(const acc_t* __restrict dg, mm_t* __restrict dg_mm, acc_t* __restrict db,
                     int64_t G) {
  if (dg_mm) {
    for (int64_t j = 0; j < G; ++j) dg_mm[j] = narrow<mm_t>(dg[j]);
  }
  for (int64_t j = 0; j < G; ++j) db[j] += dg[j];
}

// Pointers of one layer-step's backward gate pass; row b of a (B, n) block starts at b * n.
template <typename acc_t, typename mm_t>
struct BackwardStep {
  const acc_t *act, *c_prev, *tc;  // saved forward values of this layer-step
  const mm_t* d_rec;   // (B, width(l)) dA[l] from step t+1: its last H columns are dL/dh_t
  const mm_t* d_up;    // (B, 2H) dA[l+1] of this step: its first H columns are dL/dx; or null
  const acc_t* drop;   // (B, H) keep-mask between this layer and the one above, or null
  const acc_t* d_out;  // top layer: total gradient at this step's output (B, K); else null
  acc_t* dh;           // scratch (B, H)
  acc_t* dc;           // in/out: dL/dc carried back through the forget gate (B, H)
  acc_t* dg;           // out: gate gradients (B, G)
  mm_t* dg_mm;         // out: the same as the GEMM operand, or null where dg is it
  acc_t* db;           // in/out: bias gradient summed over steps, per row (B, G)
};

template <typename acc_t, typename mm_t>
void gates_backward_rows(const BackwardStep<acc_t, mm_t>& s, const Dims& d, int64_t l,
                         const acc_t* w_out_t, int64_t b0, int64_t b1) {
  const int64_t H = d.H, G = d.G;
  for (int64_t b = b0; b < b1; ++b) {
    acc_t* dh = s.dh + b * H;
    gather_dh(s.d_rec + b * d.width(l) + d.in(l), s.d_up ? s.d_up + b * 2 * H : nullptr,
              s.drop ? s.drop + b * H : nullptr, s.d_out ? s.d_out + b * d.K : nullptr, w_out_t,
              dh, d);
    cell_backward(s.act + b * G, s.c_prev + b * H, s.tc + b * H, dh, s.dc + b * H, s.dg + b * G,
                  H);
    store_dg(s.dg + b * G, s.dg_mm ? s.dg_mm + b * G : nullptr, s.db + b * G, G);
  }
}

// Layer 0's input at step t was the model's own output at t-1 where use_truth is 0: its
// gradient joins the total output gradient of step t-1.
template <typename acc_t>
void feedback_rows(const acc_t* dg, const acc_t* w_y, const acc_t* use_truth,
                   const acc_t* d_yhat_prev, acc_t* d_out_prev, const Dims& d, int64_t b0,
                   int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t* __restrict row = dg + b * d.G;
    for (int64_t k = 0; k < d.K; ++k) {
      const acc_t* __restrict w = w_y + k * d.G;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d.G; ++j) sum += row[j] * w[j];
      d_out_prev[b * d.K + k] = d_yhat_prev[b * d.K + k] + sum * (1 - use_truth[b]);
    }
  }
}

// Every tensor of one backward, member first; `member` runs one member's whole time loop back
// and then its weight-gradient GEMMs.
template <typename acc_t, typename mm_t>
struct Backward {
  Dims d;
  bool mixed;  // GEMMs in another dtype than the states (bfloat16)
  // inputs and what the forward saved
  Tensor d_yhat, x0, use_truth, c0, drop, w_y, w_out_t, act, C, TC, Htop, Y_in;
  std::vector<Tensor> A, WT;  // A[l] (M, T, B, width), W[l]^T (M, G, width)
  // dA[l] (M, B, width): layer l's latest backward GEMM, dG[l, t] @ W[l]^T = [dL/dx_t,
  // dL/dh_{t-1}]; zero before the last step, where nothing comes back from the future
  std::vector<Tensor> dA, dG_mm, d_bias;  // gate gradients (M, T, B, G) in the GEMM dtype; (M, B, G)
  Tensor dG0;     // layer 0's gate gradients (M, T, B, G), in acc_t for its inputs
  Tensor dc, dh;  // (M, L, B, H), scratch (M, B, H)
  Tensor scratch;  // gate gradients of layers >= 1 before narrowing (M, B, G)
  Tensor d_out;    // total gradient at each output (M, T, B, K)
  Tensor d_xy, d_w_out;  // out: [w_x; w_y] (M, F + K, G), w_out (M, H, K) gradients
  std::vector<Tensor> dW;  // out: [w_ih; w_hh] gradients (M, width, G)

  void member(int64_t m, bool split) const {
    const int64_t T = d.T, B = d.B, H = d.H, G = d.G, K = d.K, L = d.L;
    const auto ptr = [m](const Tensor& x) { return member_ptr<acc_t>(x, m); };
    std::vector<Tensor> dA_m, WT_m;
    std::vector<std::vector<Tensor>> dG_mm_step;
    for (int64_t l = 0; l < L; ++l) {
      dA_m.push_back(dA[l].select(0, m));
      WT_m.push_back(WT[l].select(0, m));
      dG_mm_step.push_back(dG_mm[l].select(0, m).unbind(0));
    }
    const acc_t *wy = ptr(w_y), *wo = ptr(w_out_t), *ut = ptr(use_truth), *dy = ptr(d_yhat);
    const acc_t *dr = ptr(drop), *c0p = ptr(c0), *actp = ptr(act);
    const acc_t *Cp = ptr(C), *TCp = ptr(TC);
    acc_t *dop = ptr(d_out), *dG0p = ptr(dG0);

    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t lt = l * T + t;  // layer-step index into act, C, TC, drop
        BackwardStep<acc_t, mm_t> s{};
        s.act = actp + lt * B * G;
        s.c_prev = t == 0 ? c0p + l * B * H : Cp + (lt - 1) * B * H;
        s.tc = TCp + lt * B * H;
        s.d_rec = dA_m[l].data_ptr<mm_t>();
        s.d_up = l + 1 < L ? dA_m[l + 1].data_ptr<mm_t>() : nullptr;
        s.drop = dr && l + 1 < L ? dr + lt * B * H : nullptr;
        s.d_out = l == L - 1 ? dop + t * B * K : nullptr;
        s.dh = ptr(dh);
        s.dc = ptr(dc) + l * B * H;
        s.dg = l == 0 ? dG0p + t * B * G : ptr(scratch);
        s.dg_mm = l == 0 && !mixed ? nullptr : member_ptr<mm_t>(dG_mm[l], m) + t * B * G;
        if constexpr (std::is_same_v<acc_t, mm_t>) {  // the GEMM reads the acc_t gradients
          if (l > 0) s.dg = s.dg_mm, s.dg_mm = nullptr;
        }
        s.db = ptr(d_bias[l]);
        over_rows(B, G, split, [&](int64_t b0, int64_t b1) {
          gates_backward_rows(s, d, l, wo, b0, b1);
          if (l == 0 && t > 0) {
            feedback_rows(s.dg, wy, ut + t * B, dy + (t - 1) * B * K, dop + (t - 1) * B * K, d,
                          b0, b1);
          }
        });
        at::mm_out(dA_m[l], dG_mm_step[l][t], WT_m[l]);
      }
    }
    weight_gradients(m);
  }

  // Member m's weight gradients: one GEMM over all T*B rows per weight instead of T small ones;
  // layer 0's narrow inputs [x0, y_in] share one.
  void weight_gradients(int64_t m) const {
    const int64_t rows = d.T * d.B, H = d.H, G = d.G, K = d.K;
    const auto rows_of = [&](const Tensor& x, int64_t width) {
      return x.select(0, m).view({rows, width});
    };
    Tensor out = d_xy.select(0, m);
    at::mm_out(out, at::cat({rows_of(x0, d.F), rows_of(Y_in, K)}, 1).t(), rows_of(dG0, G));
    out = d_w_out.select(0, m);
    at::mm_out(out, rows_of(Htop, H).t(), rows_of(d_out, K));
    for (int64_t l = 0; l < d.L; ++l) {
      mm_into(dW[l].select(0, m), rows_of(A[l], d.width(l)).t(), rows_of(dG_mm[l], G));
    }
  }
};

template <typename acc_t, typename mm_t>
std::vector<Tensor> backward_impl(const Dims& d, const Tensor& d_yhat, const Tensor& x0,
                                  const Tensor& use_truth, const Tensor& c0,
                                  const std::optional<Tensor>& drop, const Tensor& w_y,
                                  const Tensor& w_out, const Tensor& act, const Tensor& C,
                                  const Tensor& TC, const Tensor& Htop, const Tensor& Y_in,
                                  at::TensorList A, at::TensorList W) {
  const int64_t M = d.M, T = d.T, B = d.B, H = d.H, G = d.G, K = d.K, L = d.L;
  const auto acc = d_yhat.options(), low = A[0].options();
  Backward<acc_t, mm_t> b{d, low.dtype() != acc.dtype(), d_yhat, x0, use_truth, c0};
  b.drop = drop ? *drop : Tensor();
  b.w_y = w_y, b.w_out_t = w_out.transpose(1, 2).contiguous();
  b.act = act, b.C = C, b.TC = TC, b.Htop = Htop, b.Y_in = Y_in;
  b.dG0 = buffer({M, T, B, G}, acc);
  for (int64_t l = 0; l < L; ++l) {
    b.A.push_back(A[l]);
    b.dA.push_back(at::zeros({M, B, d.width(l)}, low));
    b.WT.push_back(W[l].transpose(1, 2).contiguous());  // a transposed view takes a slower path
    b.dG_mm.push_back(l == 0 && !b.mixed ? b.dG0 : buffer({M, T, B, G}, low));
    b.d_bias.push_back(at::zeros({M, B, G}, acc));  // summed per row: no (T, B, G) pass at the end
    b.dW.push_back(at::empty({M, d.width(l), G}, acc));
  }
  b.dc = at::zeros({M, L, B, H}, acc), b.dh = at::empty({M, B, H}, acc);
  b.scratch = at::empty({M, B, G}, acc);
  b.d_out = at::empty({M, T, B, K}, acc);
  b.d_out.select(1, T - 1).copy_(d_yhat.select(1, T - 1));
  b.d_xy = at::empty({M, d.F + K, G}, acc), b.d_w_out = at::empty({M, H, K}, acc);
  for_members(M, [&](int64_t m, bool split) { b.member(m, split); });

  std::vector<Tensor> d_h0;
  for (int64_t l = 0; l < L; ++l) d_h0.push_back(b.dA[l].narrow(2, d.in(l), H).to(acc.dtype()));
  std::vector<Tensor> grads{b.dG0,
                            b.d_xy.narrow(1, 0, d.F),
                            b.d_bias[0].sum(1),
                            at::stack(d_h0, 1),
                            b.dc,
                            b.d_xy.narrow(1, d.F, K),
                            b.d_w_out,
                            b.d_out.sum({1, 2})};
  for (int64_t l = 0; l < L; ++l) {
    if (l == 0) {
      grads.push_back(b.dW[0]);
    } else {
      grads.insert(grads.end(),
                   {b.dW[l].narrow(1, 0, H), b.dW[l].narrow(1, H, H), b.d_bias[l].sum(1)});
    }
  }
  return grads;
}

// ---- the ops -----------------------------------------------------------------------------------

template <typename F>
auto by_dtype(at::ScalarType acc, at::ScalarType mm, const F& run) {
  if (acc == at::kDouble && mm == at::kDouble) return run(double{}, double{});
  TORCH_CHECK(acc == at::kFloat, "seqgen native recurrence: float or double states");
  if (mm == at::kBFloat16) return run(float{}, at::BFloat16{});
  TORCH_CHECK(mm == at::kFloat, "seqgen native recurrence: GEMMs in float or bfloat16");
  return run(float{}, float{});
}

Tensor dense(const Tensor& x) { return x.contiguous(); }
std::optional<Tensor> dense(const std::optional<Tensor>& x) {
  return x ? std::optional<Tensor>(x->contiguous()) : std::nullopt;
}

// x0 (M, T, B, F), y_teacher (M, T, B, K), c0 (M, L, B, H)
Dims dims_of(const Tensor& x0, const Tensor& y_teacher, const Tensor& c0) {
  const int64_t H = c0.size(3);
  return {x0.size(0), x0.size(1), x0.size(2), H, 4 * H, y_teacher.size(3), x0.size(3),
          c0.size(1)};
}

// y_hat (M, T, B, K) and, with save, what backward needs: act, C, TC, Htop, Y_in, A[0..L), W[0..L).
// Arguments as NativeAutoregressiveLSTM.forward in seqgen/model/recurrence.py.
std::vector<Tensor> forward(const Tensor& x0, const Tensor& w_x, const Tensor& b_x,
                            const Tensor& y_teacher, const Tensor& use_truth, const Tensor& h0,
                            const Tensor& c0, const std::optional<Tensor>& drop,
                            const Tensor& w_y, const Tensor& w_out, const Tensor& b_out,
                            at::TensorList layer_w, at::ScalarType mm, bool save) {
  TORCH_CHECK(x0.device().is_cpu(), "seqgen native recurrence: CPU tensors only");
  std::vector<Tensor> w;
  for (const auto& x : layer_w) w.push_back(x.contiguous());
  return by_dtype(x0.scalar_type(), mm, [&](auto acc_tag, auto mm_tag) {
    return forward_impl<decltype(acc_tag), decltype(mm_tag)>(
        dims_of(x0, y_teacher, c0), dense(x0), dense(w_x), dense(b_x), dense(y_teacher),
        dense(use_truth), dense(h0), dense(c0), dense(drop), dense(w_y), w_out, dense(b_out), w,
        mm, save);
  });
}

// Gradients: layer 0's gate gradients (M, T, B, G) (x0's gradient is that @ w_x^T), then those of
// w_x, b_x, h0, c0, w_y, w_out, b_out, w_hh_0 and (w_ih_l, w_hh_l, b_l) for l >= 1.
std::vector<Tensor> backward(const Tensor& d_yhat, const Tensor& x0, const Tensor& use_truth,
                             const Tensor& c0, const std::optional<Tensor>& drop,
                             const Tensor& w_y, const Tensor& w_out, const Tensor& act,
                             const Tensor& C, const Tensor& TC, const Tensor& Htop,
                             const Tensor& Y_in, at::TensorList A, at::TensorList W) {
  return by_dtype(d_yhat.scalar_type(), A[0].scalar_type(), [&](auto acc_tag, auto mm_tag) {
    return backward_impl<decltype(acc_tag), decltype(mm_tag)>(
        dims_of(x0, Y_in, c0), dense(d_yhat), dense(x0), dense(use_truth), dense(c0),
        dense(drop), dense(w_y), w_out, act, C, TC, Htop, Y_in, A, W);
  });
}

// out[i] = a[i] @ b[i] for every i and nothing else: `seqgen bench` times the recurrence's GEMMs
// alone with it (the GEMM-only limit), without a Python call per GEMM.
void run_gemms(at::TensorList outs, at::TensorList as, at::TensorList bs) {
  for (size_t i = 0; i < outs.size(); ++i) {
    Tensor out = outs[i];
    at::mm_out(out, as[i], bs[i]);
  }
}

}  // namespace

TORCH_LIBRARY(seqgen_native, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("run_gemms", &run_gemms);
}
