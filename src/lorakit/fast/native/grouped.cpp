// lorakit's CPU kernel for the per-row grouped pair (functional.grouped_lora_into_): for every kept place
// (g, p) of G groups of W places, its T token rows i get
//     y_i += keep[g, p] · (x_i A_gᵀ) (s·B_g)ᵀ            x_i: (in,), A_g: (r, in), s·B_g: (r, out)
// in one call, fp32, in place. Built and loaded by lorakit/fast/native/__init__.py (torch.utils.cpp_extension)
// and tested against the plain math in tests/test_fast_native.py.
//
// Why a kernel: at decode sizes (a handful of rows per adapter) the two bmm of the eager pair are bound by
// reading the factors and by the cost of each op, not by arithmetic. Here a pair of rows meets A_g once
// (4 rows of A against both rows per 16-float step: 8 accumulators) and s·B_g once (each 64-wide block of y
// kept in registers over the r rows of s·B_g), with no intermediate tensor and one call per layer.
// Vectors are GCC/Clang vector extensions: AVX-512 registers where -march=native has them; elsewhere the
// compiler lowers the same source to the registers there are (AVX2, NEON; only AVX-512 measured).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));  // 16 floats
constexpr int64_t L = 16;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < L; ++i) s += v[i]; return s; }

// u[q][j] = x_q · A_j for the Q rows x[q] and the JB rows j0 .. j0 + JB - 1 of A (r, in)
template <int Q, int JB>
inline void down_block(const float* const* x, const float* A, int64_t in, int64_t j0, float (*u)[256]) {
  vf acc[Q][JB] = {};
  int64_t k = 0;
  for (; k + L <= in; k += L) {
    vf xv[Q];
    for (int q = 0; q < Q; ++q) xv[q] = load(x[q] + k);
    for (int j = 0; j < JB; ++j) {
      const vf a = load(A + (j0 + j) * in + k);
      for (int q = 0; q < Q; ++q) acc[q][j] += a * xv[q];
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < JB; ++j) {
      float s = hsum(acc[q][j]);
      for (int64_t t = k; t < in; ++t) s += x[q][t] * A[(j0 + j) * in + t];
      u[q][j0 + j] = s;
    }
}

// y_q += u_q · sB (r, out) for the Q rows y[q]
template <int Q>
inline void up(float* const* y, const float* sB, int64_t r, int64_t out, const float (*u)[256]) {
  constexpr int OB = 4;  // 64 outputs per block: Q·4 accumulators
  int64_t o = 0;
  for (; o + OB * L <= out; o += OB * L) {
    vf acc[Q][OB];
    for (int q = 0; q < Q; ++q)
      for (int b = 0; b < OB; ++b) acc[q][b] = load(y[q] + o + b * L);
    for (int64_t j = 0; j < r; ++j) {
      vf bv[OB];
      for (int b = 0; b < OB; ++b) bv[b] = load(sB + j * out + o + b * L);
      for (int q = 0; q < Q; ++q)
        for (int b = 0; b < OB; ++b) acc[q][b] += u[q][j] * bv[b];
    }
    for (int q = 0; q < Q; ++q)
      for (int b = 0; b < OB; ++b) store(y[q] + o + b * L, acc[q][b]);
  }
  for (; o < out; ++o)
    for (int q = 0; q < Q; ++q) {
      float s = y[q][o];
      for (int64_t j = 0; j < r; ++j) s += u[q][j] * sB[j * out + o];
      y[q][o] = s;
    }
}

template <int Q>
void pair(const float* const* x, float* const* y, const float* scale, const float* A, const float* sB, int64_t r,
          int64_t in, int64_t out) {
  float u[Q][256];
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) down_block<Q, 4>(x, A, in, j, u);
  for (; j < r; ++j) down_block<Q, 1>(x, A, in, j, u);
  for (int q = 0; q < Q; ++q)
    if (scale[q] != 1.f)
      for (int64_t t = 0; t < r; ++t) u[q][t] *= scale[q];
  up<Q>(y, sB, r, out, u);
}

struct Item {  // one or two token rows of one group
  int64_t group, row[2];
  float scale[2];
  int n;
};

}  // namespace

// y (N, out), x (N, in): token rows, tokens consecutive per batch row (N = batch · tokens).
// A (G, r, in), sB (G, r, out). index: empty (place (g, p) is batch row g·W + p) or (G·W,) int64 batch rows.
// keep: empty (all 1) or (G·W,) float32; a place with keep 0 adds nothing and is not read.
void grouped_lora_(torch::Tensor y, torch::Tensor x, torch::Tensor A, torch::Tensor sB, torch::Tensor index,
                   torch::Tensor keep, int64_t width, int64_t tokens) {
  for (const auto* t : {&y, &x, &A, &sB})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "grouped_lora_: y, x, A and sB must be contiguous float32 CPU tensors");
  TORCH_CHECK(A.dim() == 3 && sB.dim() == 3 && x.dim() == 2 && y.dim() == 2, "grouped_lora_: shapes");
  const int64_t G = A.size(0), r = A.size(1), in = A.size(2), out = sB.size(2);
  TORCH_CHECK(sB.size(0) == G && sB.size(1) == r && x.size(1) == in && y.size(1) == out && x.size(0) == y.size(0),
              "grouped_lora_: A ", A.sizes(), ", sB ", sB.sizes(), ", x ", x.sizes(), ", y ", y.sizes(),
              " do not agree");
  TORCH_CHECK(r <= 256, "grouped_lora_: rank ", r, " over 256");
  TORCH_CHECK(tokens > 0 && x.size(0) % tokens == 0, "grouped_lora_: ", x.size(0), " rows, ", tokens, " tokens");
  const int64_t batch = x.size(0) / tokens, places = G * width;
  const int64_t* ip = nullptr;
  if (index.numel()) {
    TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == places,
                "grouped_lora_: index must be ", places, " contiguous int64");
    ip = index.data_ptr<int64_t>();
    for (int64_t i = 0; i < places; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < batch, "grouped_lora_: index ", ip[i], " outside ", batch, " rows");
  } else {
    TORCH_CHECK(batch == places, "grouped_lora_: ", batch, " rows are not ", G, " groups of ", width);
  }
  const float* kp = nullptr;
  if (keep.numel()) {
    TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.is_contiguous() && keep.numel() == places,
                "grouped_lora_: keep must be ", places, " contiguous float32");
    kp = keep.data_ptr<float>();
  }
  // Work items: token rows two by two within a group. A batch row under two kept places would make two
  // items write the same memory (or one item hold it twice): then every item is one row, run in order.
  bool repeats = false;
  if (ip) {
    std::vector<char> seen(batch, 0);
    for (int64_t i = 0; i < places && !repeats; ++i)
      if (!kp || kp[i] != 0.f) { repeats = seen[ip[i]] != 0; seen[ip[i]] = 1; }
  }
  const int per_item = repeats ? 1 : 2;
  std::vector<Item> items;
  for (int64_t g = 0; g < G; ++g) {
    Item cur{g, {0, 0}, {0.f, 0.f}, 0};
    for (int64_t p = 0; p < width; ++p) {
      const int64_t place = g * width + p;
      const float s = kp ? kp[place] : 1.f;
      if (s == 0.f) continue;
      const int64_t b = ip ? ip[place] : place;
      for (int64_t t = 0; t < tokens; ++t) {
        cur.row[cur.n] = b * tokens + t;
        cur.scale[cur.n++] = s;
        if (cur.n == per_item) { items.push_back(cur); cur.n = 0; }
      }
    }
    if (cur.n) items.push_back(cur);
  }
  const float* xp = x.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const float* Bp = sB.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const float* xs[2] = {xp + it.row[0] * in, xp + it.row[1] * in};
      float* ys[2] = {yp + it.row[0] * out, yp + it.row[1] * out};
      const float* a = Ap + it.group * r * in;
      const float* b = Bp + it.group * r * out;
      if (it.n == 2) pair<2>(xs, ys, it.scale, a, b, r, in, out);
      else pair<1>(xs, ys, it.scale, a, b, r, in, out);
    }
  };
  const int64_t n = static_cast<int64_t>(items.size());
  if (repeats) run(0, n);
  else at::parallel_for(0, n, 1, run);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_lora_", &grouped_lora_, "y += keep · (x A_gᵀ)(s·B_g)ᵀ per group, in place (see grouped.cpp)");
}
