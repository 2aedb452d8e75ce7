// CPU kernels of the pair ops fusedloss::pair_extrema, pair_row_stats and
// pair_row_stats_backward (contracts: python/fusedloss/_schemas.py; per-pair math and its
// derivatives: csrc/include/fusedloss/pairs.h).
//
// Tiles. The N x M similarity matrix is visited one tile of B query rows x T reference rows
// at a time: S = x_blk r_blk^T by ATen's matmul (MKL) into one reused B x T buffer, then an
// epilogue over the tile's rows in parallel (at::parallel_for), each row in vectorised
// loops. Tiles go query block by query block, and within one over the reference blocks in
// order, so each row meets its columns in increasing order (first index on ties). Nothing
// of size N x M is ever stored: extra memory is the tile, fp32 copies of x and r for fp16
// / bf16 inputs (and fp32 gradient accumulators), and O(N + M) per-row / per-column values.
//
// Passes.
//   pair_extrema: one pass over the tiles. Each row keeps its smallest key (pairs.h) and
//     its first index, for positives and for negatives: per row and tile a vectorised
//     masked minimum, and only when it beats the running one a scan for its first column.
//     NaN is the smallest key (torch.min's rule): a NaN score wins with its first column.
//   pair_row_stats: one pass over the tiles. Kinds 0 and 1 fold each tile row into an
//     online, max-rescaled log-sum-exp: a vectorised maximum of the kept exponents, the
//     running sum rescaled once when the maximum grows, then a vectorised sum of
//     exp(exponent - maximum). Kind 0 starts at maximum 0, sum 1 (the "1 +" term); kind 1
//     at -inf, 0. Kind 1 adds the positives' logits and count in the maximum's loop, kind 2
//     its sums and counts in a single loop.
//   pair_row_stats_backward: one pass over the tiles, recomputing S. The epilogue
//     overwrites the tile with W (dL/dS, or for distance 1 -a with a = (dL/dd) / d), then
//     two more products per tile: grad_x_blk += W r_blk and
//     grad_r_blk += W^T x_blk. Both accumulate in place in [N, D] / [M, D] buffers, so on
//     the CPU one pass serves both gradients: a separate column-tiled pass for grad_r (as
//     a GPU kernel needs, to avoid atomics) would recompute every S and W a second time.
//     Distance 1 then adds (sum_j a_ij) x_i and (sum_i a_ij) r_j (pairs.h), from the tile's
//     row and column sums taken after the epilogue.
//
// Block sizes: block_size > 0 makes B = T = block_size; 0 picks B = 256, T = 1024 (a 1 MiB
// fp32 tile, half of it per core with 2 threads, inside L2), or B = T = 512 when ref is x
// (square blocks for the symmetric path below). Every tile's epilogue is one parallel
// region, which ends when its slowest thread does; with nb = N / B blocks the symmetric
// path has nb (nb + 1) / 2 tiles and multiplies that fraction of the nb^2 products, so a
// larger B means fewer regions for a slightly larger share of the products (10 of 16 at
// B = N / 4, 36 of 64 at B = N / 8).
//
// Own reference (ref is x: the same data, sizes and strides, as the functions pass the
// batch without a reference set). Then S = x x^T is symmetric and S_JI = S_IJ^T, so with
// square blocks only the tiles I <= J are multiplied: pair_extrema and pair_row_stats fold
// S_IJ into the rows of block I and its transpose into the rows of block J, in one parallel
// pass per tile whose threads transpose their share of the columns into a second tile
// buffer (for_each_score_row, for_rows_of_both_blocks; the labels and the excluded column
// are still each row's own, so nothing else about symmetry is assumed). The backward combines
// both gradients into one product pass (symmetric_backward_kernel, derived there). With
// nb = N / B blocks that is nb (nb + 1) / 2 of the nb^2 products: 36 / 64 at N = 2048.
// Order, hence determinism: tiles go I = 0, 1, ... outer and J = I, I + 1, ... inner, so
// block K's rows meet column blocks 0 .. K - 1 (as transposes of (I, K), increasing I),
// then K, K + 1, ...: every row folds its columns in increasing order, the same order as
// the general path, whatever the thread count (each row is folded by one thread).
//
// Distance 1: the tile becomes distances right after its GEMM (to_distances), so every
// epilogue reads scores; the backward's a = w / d then needs no square root. Near pairs
// (d^2 < kappa (|x|^2 + |r|^2), where the Gram form cancels; pairs.h derives kappa and the
// error bounds) cost one compare per entry and, in a row that has any, their d^2 from the
// differences (redo_near_pairs). score_tile hands their columns to the backward, which takes
// them out of the products and adds a_ij (x_i - r_j) from the differences
// (take_out_near_pairs).
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <fusedloss/pairs.h>

#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace {

using pairs::Contrastive;
using pairs::MultiSimilarity;
using pairs::SupCon;

constexpr const char* kExtremaOp = "pair_extrema";
constexpr const char* kStatsOp = "pair_row_stats";
constexpr const char* kBackwardOp = "pair_row_stats_backward";

constexpr int64_t kDefaultRows = 256;   // B: query rows per tile
constexpr int64_t kDefaultCols = 1024;  // T: reference rows per tile
constexpr int64_t kDefaultSymmetricBlock = 512;  // B = T when ref is x

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// The vectorised loops of this file: one clone per instruction set (vec_math.h), with every
// call inside inlined (flatten). Without it GCC's inliner, at its unit-growth limit in a
// file of this many instantiations, leaves fast_exp an out-of-line call, which keeps the
// loops that take exponentials scalar.
#define FL_PAIR_LOOP FL_CPU_CLONES __attribute__((flatten))

// ---- inputs and tiles -------------------------------------------------------------------

// The operands of every op, in the accumulation dtype.
template <typename acc_t>
struct PairInputs {
  at::Tensor x;  // [N, D] contiguous
  at::Tensor r;  // [M, D] contiguous (the same tensor as x when ref is x)
  const int64_t* labels;
  const int64_t* ref_labels;
  at::Tensor sq_x, sq_r;  // squared row norms, distance 1 only
  int64_t N, M, self_offset;
  bool euclidean;
  bool symmetric;  // ref is x (refers_to_x): S = x x^T is symmetric, see "Own reference"
};

// Whether ref is x itself: the same dtype, data, sizes and strides (the functions pass the
// batch as both when it is its own reference).
bool refers_to_x(const at::Tensor& x, const at::Tensor& ref) {
  return ref.is_same(x) ||
         (ref.scalar_type() == x.scalar_type() && ref.data_ptr() == x.data_ptr() &&
          ref.sizes() == x.sizes() && ref.strides() == x.strides());
}

// sum_k v_k^2
template <typename acc_t>
FL_PAIR_LOOP acc_t sum_squares(const acc_t* v, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += v[k] * v[k];
  return s;
}

template <typename acc_t>
at::Tensor squared_norms(const at::Tensor& v) {
  const int64_t rows = v.size(0), D = v.size(1);
  at::Tensor out = at::empty({rows}, v.options());
  const acc_t* vp = v.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t i = b; i < e; ++i) op[i] = sum_squares(vp + i * D, D);
                   });
  return out;
}

template <typename acc_t>
PairInputs<acc_t> make_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                              const at::Tensor& ref_labels, int64_t distance, int64_t self_offset) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  PairInputs<acc_t> in;
  in.x = x.to(acc_type).contiguous();
  in.symmetric = refers_to_x(x, ref);
  in.r = in.symmetric ? in.x : ref.to(acc_type).contiguous();
  in.labels = labels.data_ptr<int64_t>();
  in.ref_labels = ref_labels.data_ptr<int64_t>();
  in.N = x.size(0);
  in.M = ref.size(0);
  in.self_offset = self_offset;
  in.euclidean = distance == pairs::kEuclidean;
  if (in.euclidean) {
    in.sq_x = squared_norms<acc_t>(in.x);
    in.sq_r = in.symmetric ? in.sq_x : squared_norms<acc_t>(in.r);
  }
  return in;
}

struct Tiling {
  int64_t rows, cols;  // B, T
};

// Square tiles when ref is x: one partition serves as row and as column blocks.
Tiling choose_tiling(int64_t N, int64_t M, int64_t block_size, bool symmetric) {
  const int64_t rows =
      block_size > 0 ? block_size : symmetric ? kDefaultSymmetricBlock : kDefaultRows;
  const int64_t cols =
      block_size > 0 ? block_size : symmetric ? kDefaultSymmetricBlock : kDefaultCols;
  return {std::max<int64_t>(1, std::min(rows, N)), std::max<int64_t>(1, std::min(cols, M))};
}

// row_j = max(sq_x + sq_r_j - 2 row_j, 0): a tile row of similarities as squared distances
// by the Gram form; returns how many of them are near pairs (pairs.h), counted in acc_t so
// that the loop stays in one vector type.
template <typename acc_t>
FL_PAIR_LOOP acc_t to_squared_distances(acc_t* row, const acc_t* sq_r, acc_t sq_x, int64_t n) {
  acc_t near = 0;
#pragma omp simd reduction(+ : near)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d2 = pairs::squared_distance(sq_x, sq_r[j], row[j]);
    row[j] = d2;
    near += pairs::is_near(d2, sq_x, sq_r[j]) ? acc_t(1) : acc_t(0);
  }
  return near;
}

// Per row of a tile, the columns of its near pairs (pairs.h), in increasing order; only rows
// that have one allocate.
using NearColumns = std::vector<std::vector<int64_t>>;

// The near pairs of row i of a tile of Gram squared distances (columns from j0) get their
// squared distances from the differences, and their columns appended to `near`.
template <typename acc_t>
void redo_near_pairs(const PairInputs<acc_t>& in, int64_t i, int64_t j0, int64_t cols,
                     acc_t* row, std::vector<int64_t>& near) {
  const int64_t D = in.x.size(1);
  const acc_t* x_i = in.x.template data_ptr<acc_t>() + i * D;
  const acc_t* r = in.r.template data_ptr<acc_t>() + j0 * D;
  const acc_t sq_x = in.sq_x.template data_ptr<acc_t>()[i];
  const acc_t* sq_r = in.sq_r.template data_ptr<acc_t>() + j0;
  for (int64_t j = 0; j < cols; ++j) {
    if (!pairs::is_near(row[j], sq_x, sq_r[j])) continue;
    row[j] = pairs::direct_squared_distance(x_i, r + j * D, D);
    near.push_back(j);
  }
}

// The tile of similarities of rows i0... and columns j0... as distances d (pairs.h), in
// place: the Gram form, and the differences for the near pairs, whose columns go to `near`
// (one entry per tile row). The square roots go through ATen's vectorised sqrt_: GCC keeps
// std::sqrt scalar where errno may have to be set, as it may under the default -fmath-errno.
template <typename acc_t>
void to_distances(const PairInputs<acc_t>& in, at::Tensor& S, int64_t i0, int64_t j0,
                  NearColumns& near) {
  const int64_t rows = S.size(0), cols = S.size(1);
  acc_t* tile = S.data_ptr<acc_t>();
  const acc_t* sq_x = in.sq_x.template data_ptr<acc_t>() + i0;
  const acc_t* sq_r = in.sq_r.template data_ptr<acc_t>() + j0;
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      acc_t* row = tile + r * cols;
      acc_t near_count = to_squared_distances(row, sq_r, sq_x[r], cols);
      // Ref is x: a row's own column is at distance 0 exactly, without any near-pair work.
      const int64_t own = in.symmetric ? i0 + r - j0 : -1;
      if (own >= 0 && own < cols) {
        near_count -= pairs::is_near(row[own], sq_x[r], sq_r[own]) ? acc_t(1) : acc_t(0);
        row[own] = acc_t(0);
      }
      if (near_count > 0) redo_near_pairs(in, i0 + r, j0, cols, row, near[r]);
    }
  });
  S.sqrt_();
}

// The scores of x[i0 : i0 + rows] and r[j0 : j0 + cols] (similarities, or distances for
// distance 1) into the front of `buffer`, as a contiguous rows x cols tile; for distance 1
// the near pairs' columns per row into `near` (reset here).
template <typename acc_t>
at::Tensor score_tile(const PairInputs<acc_t>& in, at::Tensor& buffer, int64_t i0, int64_t rows,
                      int64_t j0, int64_t cols, NearColumns& near) {
  at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
  at::mm_out(S, in.x.narrow(0, i0, rows), in.r.narrow(0, j0, cols).t());
  near.assign(rows, {});
  if (in.euclidean) to_distances(in, S, i0, j0, near);
  return S;
}

// Calls f(r) for each row r of a tile's `rows`, in parallel.
template <typename F>
void for_each_row(int64_t rows, F&& f) {
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// St rows [b, e) = S columns [b, e): part of the transpose of the rows x cols tile S, in
// strips of 16 columns (one cache line of fp32 read per row of S).
template <typename acc_t>
void transpose_columns(const acc_t* S, int64_t rows, int64_t cols, int64_t b, int64_t e,
                       acc_t* St) {
  constexpr int64_t kStrip = 16;
  for (int64_t c0 = b; c0 < e; c0 += kStrip) {
    const int64_t c1 = std::min(c0 + kStrip, e);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c) St[c * rows + r] = S[r * cols + c];
    }
  }
}

// One parallel pass over the rows of both blocks of a tile S (rows x cols, rows of x from
// i0, columns from j0) of a symmetric matrix: f(i0 + r, j0, cols, S row r) for its rows
// and, unless the tile is diagonal, f_t(j0 + c, i0, rows, St row c) for its columns, each
// thread first transposing its own columns of S into St (cols x rows). S stays as it is
// (other threads read it); f_t may overwrite the St rows it gets.
template <typename acc_t, typename F, typename FT>
void for_rows_of_both_blocks(const acc_t* S, acc_t* St, int64_t i0, int64_t rows, int64_t j0,
                             int64_t cols, F&& f, FT&& f_t) {
  const int64_t total = i0 == j0 ? rows : rows + cols;
  at::parallel_for(0, total, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < std::min(e, rows); ++k) f(i0 + k, j0, cols, S + k * cols);
    const int64_t cb = std::max(b, rows) - rows, ce = std::max(e, rows) - rows;
    if (cb >= ce) return;
    transpose_columns(S, rows, cols, cb, ce, St);
    for (int64_t c = cb; c < ce; ++c) f_t(j0 + c, i0, rows, St + c * rows);
  });
}

// Calls body(i0, rows, j0, cols, S, near) for every tile, S the rows x cols scores of
// x[i0 : i0 + rows] and r[j0 : j0 + cols] (contiguous, in a reused buffer that body may
// overwrite) and near its near pairs (score_tile), query blocks outer, reference blocks inner.
template <typename acc_t, typename Body>
void for_each_tile(const PairInputs<acc_t>& in, const Tiling& t, Body&& body) {
  if (in.N == 0 || in.M == 0) return;
  at::Tensor buffer = at::empty({t.rows * t.cols}, in.x.options());
  NearColumns near;
  for (int64_t i0 = 0; i0 < in.N; i0 += t.rows) {
    const int64_t rows = std::min(t.rows, in.N - i0);
    for (int64_t j0 = 0; j0 < in.M; j0 += t.cols) {
      const int64_t cols = std::min(t.cols, in.M - j0);
      at::Tensor S = score_tile(in, buffer, i0, rows, j0, cols, near);
      body(i0, rows, j0, cols, S, near);
    }
  }
}

// out = A + Bt^T over a rows x cols tile (Bt cols x rows), in parallel over rows, in
// strips of 16 rows (one cache line of fp32 read per row of Bt).
template <typename acc_t>
void add_transposed(const acc_t* A, const acc_t* Bt, acc_t* out, int64_t rows, int64_t cols) {
  constexpr int64_t kStrip = 16;
  at::parallel_for(0, (rows + kStrip - 1) / kStrip, 1, [&](int64_t b, int64_t e) {
    for (int64_t r0 = b * kStrip; r0 < std::min(e * kStrip, rows); r0 += kStrip) {
      const int64_t r1 = std::min(r0 + kStrip, rows);
      for (int64_t c = 0; c < cols; ++c) {
        for (int64_t r = r0; r < r1; ++r) out[r * cols + c] = A[r * cols + c] + Bt[c * rows + r];
      }
    }
  });
}

// Calls f(i, j0, cols, s) for every row i of x and every tile of its columns,
// s = S[i, j0 : j0 + cols] (similarities, or distances for distance 1), the tiles of each
// row in increasing j0, in parallel over the rows of a tile; f only reads s.
// General: for_each_tile. Ref is x: the upper tiles (I, J), I <= J, of the symmetric S,
// each serving the rows of block I and, transposed, those of block J
// (for_rows_of_both_blocks). Block K's rows thus meet the column blocks 0, 1, ..., K - 1
// (from the tiles (I, K), I < K, met in increasing I), then K, K + 1, ... (their own tiles):
// in increasing order, as in the general path.
template <typename acc_t, typename F>
void for_each_score_row(const PairInputs<acc_t>& in, const Tiling& t, F&& f) {
  if (in.N == 0 || in.M == 0) return;
  if (!in.symmetric) {
    for_each_tile(in, t, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, at::Tensor& S,
                             const NearColumns&) {
      acc_t* tile = S.data_ptr<acc_t>();
      for_each_row(rows, [&](int64_t r) { f(i0 + r, j0, cols, tile + r * cols); });
    });
    return;
  }
  const int64_t B = t.rows;
  at::Tensor buffer = at::empty({B * B}, in.x.options());
  at::Tensor transposed = at::empty({B * B}, in.x.options());
  NearColumns near;
  for (int64_t i0 = 0; i0 < in.N; i0 += B) {
    const int64_t rows = std::min(B, in.N - i0);
    for (int64_t j0 = i0; j0 < in.N; j0 += B) {
      const int64_t cols = std::min(B, in.N - j0);
      at::Tensor S = score_tile(in, buffer, i0, rows, j0, cols, near);
      for_rows_of_both_blocks(S.data_ptr<acc_t>(), transposed.data_ptr<acc_t>(), i0, rows, j0,
                              cols, f, f);
    }
  }
}

// Calls f(b, e) for the column ranges [b, e) of a tile whose columns are pairs of row i:
// all of [0, cols) but the excluded column, when it lies in the tile.
template <typename acc_t, typename F>
void for_pair_ranges(const PairInputs<acc_t>& in, int64_t i, int64_t j0, int64_t cols, F&& f) {
  const int64_t skip = pairs::excluded_column(i, in.self_offset, in.M) - j0;
  if (skip < 0 || skip >= cols) {
    f(int64_t(0), cols);
    return;
  }
  if (skip > 0) f(int64_t(0), skip);
  if (skip + 1 < cols) f(skip + 1, cols);
}

// ---- pair_extrema -----------------------------------------------------------------------

template <typename acc_t>
struct Best {
  acc_t key = kInf<acc_t>;
  int64_t index = -1;
};

// NaN is smaller than every key, as in torch.min: a NaN candidate wins, and the first NaN
// column of a row stays its pick (the reference and the Triton kernel's _first_min agree).

// Whether the smallest key of a later range replaces the running one: strictly smaller (ties
// keep the earlier column), or NaN over a number.
template <typename acc_t>
bool beats(acc_t key, acc_t running) {
  return key < running || (key != key && running == running);
}

// Smallest key = sign * s (positives) and -sign * s (negatives) over [b, e) of one row, NaN
// when a candidate of that polarity is NaN. The vectorised loop takes the minimum of the
// numbers (a NaN key fails `key < kp` and drops out there) and, beside it, `nan`: 0 in every
// lane until the lane meets a NaN score, NaN from then on (one blend per entry; the lanes'
// sum is NaN iff one is). Only a range that holds a NaN pays for the scalar scan that gives
// the NaN scores their polarities.
template <typename acc_t>
FL_PAIR_LOOP void smallest_keys(const acc_t* s, const int64_t* lab, int64_t label, acc_t sign,
                                 int64_t b, int64_t e, acc_t* pos_key, acc_t* neg_key) {
  acc_t kp = kInf<acc_t>, kn = kInf<acc_t>, nan = 0;
#pragma omp simd reduction(min : kp, kn) reduction(+ : nan)
  for (int64_t j = b; j < e; ++j) {
    const acc_t key = sign * s[j];
    const bool positive = lab[j] == label;
    kp = positive && key < kp ? key : kp;
    kn = !positive && -key < kn ? -key : kn;
    nan = s[j] != s[j] ? s[j] : nan;
  }
  if (nan != nan) {
    for (int64_t j = b; j < e; ++j) {
      if (s[j] == s[j]) continue;
      (lab[j] == label ? kp : kn) = s[j];
    }
  }
  *pos_key = kp;
  *neg_key = kn;
}

// First j in [b, e) of the wanted polarity whose key equals `key` (which one of them has;
// for a NaN key, the first NaN).
template <typename acc_t>
int64_t first_with_key(const acc_t* s, const int64_t* lab, int64_t label, acc_t sign,
                       bool positive, acc_t key, int64_t b, int64_t e) {
  const bool nan = key != key;
  for (int64_t j = b; j < e; ++j) {
    if ((lab[j] == label) != positive) continue;
    const acc_t k = sign * s[j];
    if (nan ? k != k : k == key) return j;
  }
  return -1;  // unreachable: `key` came from these columns
}

template <typename acc_t>
void pair_extrema_kernel(const PairInputs<acc_t>& in, const Tiling& tiling, int64_t distance,
                         at::Tensor& values, at::Tensor& indices) {
  std::vector<Best<acc_t>> pos(in.N), neg(in.N);
  const acc_t sign = acc_t(pairs::extrema_sign(distance));
  for_each_score_row(in, tiling, [&](int64_t i, int64_t j0, int64_t cols, const acc_t* s) {
    const int64_t* lab = in.ref_labels + j0;
    for_pair_ranges(in, i, j0, cols, [&](int64_t b, int64_t e) {
      acc_t kp, kn;
      smallest_keys(s, lab, in.labels[i], sign, b, e, &kp, &kn);
      if (beats(kp, pos[i].key)) {
        pos[i] = {kp, j0 + first_with_key(s, lab, in.labels[i], sign, true, kp, b, e)};
      }
      if (beats(kn, neg[i].key)) {
        neg[i] = {kn, j0 + first_with_key(s, lab, in.labels[i], -sign, false, kn, b, e)};
      }
    });
  });
  acc_t* v = values.data_ptr<acc_t>();
  int64_t* idx = indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.N; ++i) {
    v[2 * i] = sign * pos[i].key;
    v[2 * i + 1] = -sign * neg[i].key;
    idx[2 * i] = pos[i].index;
    idx[2 * i + 1] = neg[i].index;
  }
}

// ---- online log-sum-exp -----------------------------------------------------------------

// log sum_j exp(z_j) as max + log(sum), sum = sum_j exp(z_j - max).
template <typename acc_t>
struct OnlineLse {
  acc_t max;
  acc_t sum;

  // Moves the reference point to `m` when it is larger, rescaling the sum.
  void raise_to(acc_t m) {
    if (m > max) {
      sum *= std::exp(max - m);
      max = m;
    }
  }
  acc_t value() const { return max + std::log(sum); }
};

// Exponentials below this are taken as 0: their products with a gradient would be
// subnormal, and x86 multiplies subnormals through a microcode assist (see kFlushBelow in
// vec_math.h).
template <typename acc_t>
acc_t flushed_exp(acc_t v) {
  const acc_t e = fast_exp(v);
  return e < kFlushBelow<acc_t> ? acc_t(0) : e;
}

// ---- kind 0, multi-similarity -----------------------------------------------------------

// Whether the miner keeps a pair of one row, by its rule with the row's thresholds
// (kMined), or always. A template flag rather than a runtime one, which GCC would hoist out
// of the loops into one vectorised and one scalar copy.
template <typename acc_t, bool kMined>
struct MsRowRule {
  MultiSimilarity<acc_t> ms;
  acc_t max_neg, min_pos;

  bool keeps_positive(acc_t s) const {
    if constexpr (kMined) return ms.keeps_positive(s, max_neg);
    return true;
  }
  bool keeps_negative(acc_t s) const {
    if constexpr (kMined) return ms.keeps_negative(s, min_pos);
    return true;
  }
};

// The loops below test "positive && kept" inside each select rather than through named
// masks: GCC 12 vectorises the first form and not the second.

// Largest kept exponent of the positives and of the negatives over [b, e).
template <typename acc_t, bool kMined>
FL_PAIR_LOOP void ms_max_exponents(const acc_t* s, const int64_t* lab, int64_t label,
                                    MsRowRule<acc_t, kMined> rule, int64_t b, int64_t e,
                                    acc_t* pos_max, acc_t* neg_max) {
  acc_t mp = -kInf<acc_t>, mn = -kInf<acc_t>;
#pragma omp simd reduction(max : mp, mn)
  for (int64_t j = b; j < e; ++j) {
    const bool positive = lab[j] == label;
    const acc_t z = rule.ms.exponent(s[j], positive);
    const acc_t zp = positive && rule.keeps_positive(s[j]) ? z : -kInf<acc_t>;
    const acc_t zn = !positive && rule.keeps_negative(s[j]) ? z : -kInf<acc_t>;
    mp = zp > mp ? zp : mp;
    mn = zn > mn ? zn : mn;
  }
  *pos_max = mp;
  *neg_max = mn;
}

// Sums of exp(exponent - max) of the kept positives and of the kept negatives over [b, e).
template <typename acc_t, bool kMined>
FL_PAIR_LOOP void ms_exp_sums(const acc_t* s, const int64_t* lab, int64_t label,
                               MsRowRule<acc_t, kMined> rule, int64_t b, int64_t e,
                               acc_t pos_max, acc_t neg_max, acc_t* pos_sum, acc_t* neg_sum) {
  acc_t sp = 0, sn = 0;
#pragma omp simd reduction(+ : sp, sn)
  for (int64_t j = b; j < e; ++j) {
    const bool positive = lab[j] == label;
    const acc_t term = fast_exp(rule.ms.exponent(s[j], positive) - (positive ? pos_max : neg_max));
    sp += positive && rule.keeps_positive(s[j]) ? term : acc_t(0);
    sn += !positive && rule.keeps_negative(s[j]) ? term : acc_t(0);
  }
  *pos_sum += sp;
  *neg_sum += sn;
}

// w = dL/ds = g dstat/ds of the pair's statistic (pairs.h), 0 for pairs not kept. The
// exponent of a pair that is not kept may exceed its statistic by far, so it is replaced by
// -inf (exp 0) rather than multiplied by 0 afterwards (0 * inf).
template <typename acc_t, bool kMined>
struct MsWeight {
  MsRowRule<acc_t, kMined> rule;
  acc_t stat_pos, stat_neg;
  acc_t grad_pos, grad_neg;

  acc_t operator()(acc_t s, bool positive) const {
    const acc_t z = rule.ms.exponent(s, positive);
    const acc_t arg_pos = positive && rule.keeps_positive(s) ? z - stat_pos : -kInf<acc_t>;
    const acc_t arg = !positive && rule.keeps_negative(s) ? z - stat_neg : arg_pos;
    return (positive ? grad_pos : grad_neg) * rule.ms.slope(flushed_exp(arg), positive);
  }
};

template <typename acc_t, bool kMined>
struct MultiSimilarityKind {
  static constexpr int64_t K = 2;
  struct State {
    OnlineLse<acc_t> pos{0, 1}, neg{0, 1};  // the "1 +" term: exp(0 - 0)
  };
  MultiSimilarity<acc_t> ms;
  const acc_t* thresholds;  // [N, 2] (max_neg, min_pos) when kMined

  MsRowRule<acc_t, kMined> rule(int64_t i) const {
    if constexpr (kMined) {
      return {ms, thresholds[2 * i], thresholds[2 * i + 1]};
    } else {
      return {ms, acc_t(0), acc_t(0)};
    }
  }
  void fold(State& st, const acc_t* s, const int64_t* lab, int64_t i, int64_t label, int64_t b,
            int64_t e) const {
    const MsRowRule<acc_t, kMined> rr = rule(i);
    acc_t mp, mn;
    ms_max_exponents(s, lab, label, rr, b, e, &mp, &mn);
    st.pos.raise_to(mp);
    st.neg.raise_to(mn);
    ms_exp_sums(s, lab, label, rr, b, e, st.pos.max, st.neg.max, &st.pos.sum, &st.neg.sum);
  }
  void finish(const State& st, acc_t* out) const {
    out[0] = st.pos.value();
    out[1] = st.neg.value();
  }
  MsWeight<acc_t, kMined> weight(int64_t i, const acc_t* stats, const acc_t* grad) const {
    return {rule(i), stats[0], stats[1], grad[0], grad[1]};
  }
};

// ---- kind 1, supcon / info-nce ----------------------------------------------------------

template <typename acc_t>
struct SupConSums {
  acc_t max;        // largest logit
  acc_t pos_sum;    // sum of the positives' logits
  acc_t pos_count;  // number of positives
};

template <typename acc_t>
FL_PAIR_LOOP SupConSums<acc_t> supcon_max_and_positives(const acc_t* s, const int64_t* lab,
                                                         int64_t label, SupCon<acc_t> sc,
                                                         int64_t b, int64_t e) {
  acc_t m = -kInf<acc_t>, ps = 0, pc = 0;
#pragma omp simd reduction(max : m) reduction(+ : ps, pc)
  for (int64_t j = b; j < e; ++j) {
    const acc_t z = sc.logit(s[j]);
    const bool positive = lab[j] == label;
    m = z > m ? z : m;
    ps += positive ? z : acc_t(0);
    pc += positive ? acc_t(1) : acc_t(0);
  }
  return {m, ps, pc};
}

template <typename acc_t>
FL_PAIR_LOOP acc_t supcon_exp_sum(const acc_t* s, SupCon<acc_t> sc, acc_t max, int64_t b,
                                   int64_t e) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = b; j < e; ++j) sum += fast_exp(sc.logit(s[j]) - max);
  return sum;
}

template <typename acc_t>
struct SupConWeight {
  SupCon<acc_t> sc;
  acc_t lse;
  acc_t grad_lse, grad_pos;

  acc_t operator()(acc_t s, bool positive) const {
    return sc.slope(flushed_exp(sc.logit(s) - lse), positive, grad_lse, grad_pos);
  }
};

template <typename acc_t>
struct SupConKind {
  static constexpr int64_t K = 3;
  struct State {
    OnlineLse<acc_t> lse{-kInf<acc_t>, 0};
    acc_t pos_sum = 0, pos_count = 0;
  };
  SupCon<acc_t> sc;

  void fold(State& st, const acc_t* s, const int64_t* lab, int64_t, int64_t label, int64_t b,
            int64_t e) const {
    const SupConSums<acc_t> part = supcon_max_and_positives(s, lab, label, sc, b, e);
    st.lse.raise_to(part.max);
    st.lse.sum += supcon_exp_sum(s, sc, st.lse.max, b, e);
    st.pos_sum += part.pos_sum;
    st.pos_count += part.pos_count;
  }
  void finish(const State& st, acc_t* out) const {
    out[0] = st.lse.value();  // -inf + log(0) = -inf for a row without pairs
    out[1] = st.pos_sum;
    out[2] = st.pos_count;
  }
  SupConWeight<acc_t> weight(int64_t, const acc_t* stats, const acc_t* grad) const {
    return {sc, stats[0], grad[0], grad[1]};
  }
};

// ---- kind 2, contrastive ----------------------------------------------------------------

template <typename acc_t>
struct ContrastiveSums {
  acc_t pos_loss, pos_count, neg_loss, neg_count;
};

template <typename acc_t>
FL_PAIR_LOOP ContrastiveSums<acc_t> contrastive_sums(const acc_t* s, const int64_t* lab,
                                                      int64_t label, Contrastive<acc_t> c,
                                                      int64_t b, int64_t e) {
  acc_t pl = 0, pc = 0, nl = 0, nc = 0;
#pragma omp simd reduction(+ : pl, pc, nl, nc)
  for (int64_t j = b; j < e; ++j) {
    const bool positive = lab[j] == label;
    const acc_t l = c.loss(s[j], positive);
    const acc_t counted = l > acc_t(0) ? acc_t(1) : acc_t(0);
    pl += positive ? l : acc_t(0);
    pc += positive ? counted : acc_t(0);
    nl += positive ? acc_t(0) : l;
    nc += positive ? acc_t(0) : counted;
  }
  return {pl, pc, nl, nc};
}

template <typename acc_t>
struct ContrastiveWeight {
  Contrastive<acc_t> c;
  acc_t grad_pos, grad_neg;

  acc_t operator()(acc_t s, bool positive) const {
    return (positive ? grad_pos : grad_neg) * c.slope(s, positive);
  }
};

template <typename acc_t>
struct ContrastiveKind {
  static constexpr int64_t K = 4;
  using State = ContrastiveSums<acc_t>;
  Contrastive<acc_t> c;

  void fold(State& st, const acc_t* s, const int64_t* lab, int64_t, int64_t label, int64_t b,
            int64_t e) const {
    const State part = contrastive_sums(s, lab, label, c, b, e);
    st.pos_loss += part.pos_loss;
    st.pos_count += part.pos_count;
    st.neg_loss += part.neg_loss;
    st.neg_count += part.neg_count;
  }
  void finish(const State& st, acc_t* out) const {
    out[0] = st.pos_loss;
    out[1] = st.pos_count;
    out[2] = st.neg_loss;
    out[3] = st.neg_count;
  }
  ContrastiveWeight<acc_t> weight(int64_t, const acc_t* stats, const acc_t* grad) const {
    return {c, grad[0], grad[2]};
  }
};

// ---- kind 3, orthogonal projection ------------------------------------------------------

template <typename acc_t>
struct ProjectionSums {
  acc_t pos_sum, pos_count, neg_sum, neg_count;
};

template <typename acc_t, bool kAbsolute>
FL_PAIR_LOOP ProjectionSums<acc_t> projection_sums(const acc_t* s, const int64_t* lab,
                                                    int64_t label, int64_t b, int64_t e) {
  using Opl = pairs::OrthogonalProjection<acc_t, kAbsolute>;
  acc_t ps = 0, pc = 0, ns = 0, nc = 0;
#pragma omp simd reduction(+ : ps, pc, ns, nc)
  for (int64_t j = b; j < e; ++j) {
    const bool positive = lab[j] == label;
    ps += positive ? s[j] : acc_t(0);
    pc += positive ? acc_t(1) : acc_t(0);
    ns += positive ? acc_t(0) : Opl::negative_term(s[j]);
    nc += positive ? acc_t(0) : acc_t(1);
  }
  return {ps, pc, ns, nc};
}

template <typename acc_t, bool kAbsolute>
struct ProjectionWeight {
  acc_t grad_pos, grad_neg;

  acc_t operator()(acc_t s, bool positive) const {
    using Opl = pairs::OrthogonalProjection<acc_t, kAbsolute>;
    return positive ? grad_pos : grad_neg * Opl::negative_slope(s);
  }
};

template <typename acc_t, bool kAbsolute>
struct ProjectionKind {
  static constexpr int64_t K = 4;
  using State = ProjectionSums<acc_t>;

  void fold(State& st, const acc_t* s, const int64_t* lab, int64_t, int64_t label, int64_t b,
            int64_t e) const {
    const State part = projection_sums<acc_t, kAbsolute>(s, lab, label, b, e);
    st.pos_sum += part.pos_sum;
    st.pos_count += part.pos_count;
    st.neg_sum += part.neg_sum;
    st.neg_count += part.neg_count;
  }
  void finish(const State& st, acc_t* out) const {
    out[0] = st.pos_sum;
    out[1] = st.pos_count;
    out[2] = st.neg_sum;
    out[3] = st.neg_count;
  }
  ProjectionWeight<acc_t, kAbsolute> weight(int64_t, const acc_t*, const acc_t* grad) const {
    return {grad[0], grad[2]};
  }
};

// ---- pair_row_stats ---------------------------------------------------------------------

template <typename acc_t, typename Kind>
void row_stats_kernel(const PairInputs<acc_t>& in, const Tiling& tiling, const Kind& kind,
                      at::Tensor& stats) {
  std::vector<typename Kind::State> state(in.N);
  for_each_score_row(in, tiling, [&](int64_t i, int64_t j0, int64_t cols, const acc_t* s) {
    const int64_t* lab = in.ref_labels + j0;
    for_pair_ranges(in, i, j0, cols, [&](int64_t b, int64_t e) {
      kind.fold(state[i], s, lab, i, in.labels[i], b, e);
    });
  });
  acc_t* out = stats.data_ptr<acc_t>();
  for (int64_t i = 0; i < in.N; ++i) kind.finish(state[i], out + Kind::K * i);
}

// ---- pair_row_stats_backward ------------------------------------------------------------

// row_j = w(s_j) over [b, e): the weights of distance 0, in place of S.
template <typename acc_t, typename Weight>
FL_PAIR_LOOP void write_weights(acc_t* row, const int64_t* lab, int64_t label, Weight w,
                                 int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t j = b; j < e; ++j) row[j] = w(row[j], lab[j] == label);
}

// row_j = -a_j, a_j = w(d_j) / d_j (0 at d_j = 0) over [b, e), in place of d.
template <typename acc_t, typename Weight>
FL_PAIR_LOOP void write_euclidean_coefs(acc_t* row, const int64_t* lab, int64_t label, Weight w,
                                         int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t j = b; j < e; ++j) {
    const acc_t d = row[j];
    row[j] = -pairs::euclidean_coef(w(d, lab[j] == label), d);
  }
}

// Overwrites row i of a tile (its scores at columns j0 ... j0 + cols) with the weights of
// its pairs: w = dL/ds for distance 0, -a = -(dL/dd) / d for distance 1, 0 where no pair.
template <typename acc_t, typename Kind>
void row_to_weights(const PairInputs<acc_t>& in, const Kind& kind, const acc_t* grad_stats,
                    const acc_t* stats, int64_t i, int64_t j0, int64_t cols, acc_t* row) {
  const int64_t* lab = in.ref_labels + j0;
  const int64_t K = Kind::K;
  const auto w = kind.weight(i, stats + K * i, grad_stats + K * i);
  const int64_t skip = pairs::excluded_column(i, in.self_offset, in.M) - j0;
  if (skip >= 0 && skip < cols) row[skip] = acc_t(0);
  for_pair_ranges(in, i, j0, cols, [&](int64_t b, int64_t e) {
    if (in.euclidean) {
      write_euclidean_coefs(row, lab, in.labels[i], w, b, e);
    } else {
      write_weights(row, lab, in.labels[i], w, b, e);
    }
  });
}

// g += c (u - v) over D entries.
template <typename acc_t>
FL_PAIR_LOOP void add_scaled_difference(acc_t* g, acc_t c, const acc_t* u, const acc_t* v,
                                         int64_t D) {
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) g[k] += c * (u[k] - v[k]);
}

// Takes the near pairs out of a tile of weights W (rows of x from i0, columns of r from j0,
// W = -a there; pairs.h, "Near-duplicate pairs") and adds their terms from the differences:
// for each, with a = -W_rc, W_rc = 0, then g_rows[i0 + r] += a (x_i - r_j) and
// g_cols[j0 + c] -= a (x_i - r_j), for those of the two that are defined. Serial, in row-major
// order: deterministic, and no two threads write one row of g_cols.
template <typename acc_t>
void take_out_near_pairs(const PairInputs<acc_t>& in, const NearColumns& near, acc_t* W,
                         int64_t cols, int64_t i0, int64_t j0, at::Tensor& g_rows,
                         at::Tensor& g_cols) {
  const int64_t D = in.x.size(1);
  const acc_t* x = in.x.template data_ptr<acc_t>();
  const acc_t* r = in.r.template data_ptr<acc_t>();
  for (int64_t row = 0; row < static_cast<int64_t>(near.size()); ++row) {
    const int64_t i = i0 + row;
    for (const int64_t c : near[row]) {
      const acc_t a = -W[row * cols + c];
      W[row * cols + c] = acc_t(0);
      if (a == acc_t(0)) continue;  // no pair, or no weight
      const int64_t j = j0 + c;
      if (g_rows.defined()) {
        add_scaled_difference(g_rows.data_ptr<acc_t>() + i * D, a, x + i * D, r + j * D, D);
      }
      if (g_cols.defined()) {
        add_scaled_difference(g_cols.data_ptr<acc_t>() + j * D, -a, x + i * D, r + j * D, D);
      }
    }
  }
}

// The general backward: grad_x_blk += W r_blk and grad_r_blk += W^T x_blk per tile, plus
// the distance-1 row / column sum terms (see "Passes" above).
template <typename acc_t, typename Kind>
void row_stats_backward_kernel(const PairInputs<acc_t>& in, const Tiling& tiling, const Kind& kind,
                               const at::Tensor& grad_stats, const at::Tensor& stats,
                               at::Tensor& gx, at::Tensor& gr) {
  const bool x_grad = gx.defined(), ref_grad = gr.defined();
  if (!x_grad && !ref_grad) return;
  const auto opts = in.x.options();
  at::Tensor row_coef = in.euclidean && x_grad ? at::zeros({in.N}, opts) : at::Tensor();
  at::Tensor col_coef = in.euclidean && ref_grad ? at::zeros({in.M}, opts) : at::Tensor();
  const acc_t* g = grad_stats.data_ptr<acc_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  for_each_tile(in, tiling, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, at::Tensor& S,
                                const NearColumns& near) {
    acc_t* tile = S.data_ptr<acc_t>();
    for_each_row(rows, [&](int64_t r) {
      row_to_weights(in, kind, g, st, i0 + r, j0, cols, tile + r * cols);
    });
    if (in.euclidean) take_out_near_pairs(in, near, tile, cols, i0, j0, gx, gr);
    if (row_coef.defined()) row_coef.narrow(0, i0, rows).sub_(S.sum(at::IntArrayRef{1}));
    if (col_coef.defined()) col_coef.narrow(0, j0, cols).sub_(S.sum(at::IntArrayRef{0}));
    if (x_grad) {
      gx.narrow(0, i0, rows).addmm_(S, in.r.narrow(0, j0, cols));
    }
    if (ref_grad) {
      gr.narrow(0, j0, cols).addmm_(S.t(), in.x.narrow(0, i0, rows));
    }
  });
  if (x_grad && in.euclidean) gx.addcmul_(in.x, row_coef.unsqueeze(1));
  if (ref_grad && in.euclidean) gr.addcmul_(in.r, col_coef.unsqueeze(1));
}

// The backward when ref is x and both gradients are asked for: the whole gradient of the
// one tensor, returned as grad_x (grad_r stays 0; autograd adds the two, x and ref being
// one tensor). With W the N x N weights of the general pass (rows of W are rows' own
// weights, from their own statistics: W is not symmetric),
//   grad_x = W x  (x as the queries)   and   grad_r = W^T x  (x as the references),
// so the total is G x with G = W + W^T, symmetric. Per block pair I <= J of the square
// tiling, G_IJ = W_IJ + (W_JI)^T, where W_IJ comes from S_IJ with the rows of I and W_JI
// from S_JI = S_IJ^T with the rows of J (for_rows_of_both_blocks transposes), so
// one product S_IJ gives both, and
//   grad_I += G_IJ x_J,   and for I != J   grad_J += G_IJ^T x_I   (= G_JI x_I).
// That is 3 products of B x B x D per upper tile, against 6 for the two tiles (I, J) and
// (J, I) of the general pass. Distance 1: with W = -a the total is
//   grad_k = sum_j (a_kj + a_jk) x_k - sum_j (a_kj + a_jk) x_j = -(sum_j G_kj) x_k + (G x)_k,
// so the diagonal coefficient of row k is minus the row sums of G: of G_IJ for the rows
// of I and of G_IJ^T (the column sums of G_IJ) for the rows of J when I != J.
// Per tile: S_IJ; one parallel pass writing W_IJ into a third buffer W (S stays intact for
// the threads that transpose it) and W_JI in place of S_JI in the transposed buffer; one
// pass forming G = W + (W_JI)^T (W + W^T on the diagonal) over S's buffer; the products.
// Deterministic: tiles in a fixed order, each product accumulated in place in that order.
template <typename acc_t, typename Kind>
void symmetric_backward_kernel(const PairInputs<acc_t>& in, const Tiling& tiling,
                               const Kind& kind, const at::Tensor& grad_stats,
                               const at::Tensor& stats, at::Tensor& gx) {
  if (in.N == 0) return;
  const int64_t B = tiling.rows;
  at::Tensor coef = in.euclidean ? at::zeros({in.N}, in.x.options()) : at::Tensor();
  const acc_t* g = grad_stats.data_ptr<acc_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  at::Tensor buffer = at::empty({B * B}, in.x.options());
  at::Tensor transposed = at::empty({B * B}, in.x.options());
  at::Tensor weights = at::empty({B * B}, in.x.options());
  acc_t* W = weights.data_ptr<acc_t>();
  acc_t* St = transposed.data_ptr<acc_t>();
  NearColumns near;
  for (int64_t i0 = 0; i0 < in.N; i0 += B) {
    const int64_t rows = std::min(B, in.N - i0);
    const at::Tensor x_i = in.x.narrow(0, i0, rows);
    for (int64_t j0 = i0; j0 < in.N; j0 += B) {
      const int64_t cols = std::min(B, in.N - j0);
      const at::Tensor x_j = in.x.narrow(0, j0, cols);
      at::Tensor G = score_tile(in, buffer, i0, rows, j0, cols, near);
      acc_t* tile = G.data_ptr<acc_t>();
      const auto weights_of_row = [&](int64_t i, int64_t c0, int64_t n, acc_t* row) {
        row_to_weights(in, kind, g, st, i, c0, n, row);
      };
      for_rows_of_both_blocks(
          tile, St, i0, rows, j0, cols,
          [&](int64_t i, int64_t c0, int64_t n, const acc_t* s) {  // W_IJ into W
            acc_t* w = W + (i - i0) * n;
            std::copy(s, s + n, w);
            weights_of_row(i, c0, n, w);
          },
          weights_of_row);  // W_JI in place of S_JI
      add_transposed(W, j0 != i0 ? St : W, tile, rows, cols);
      if (in.euclidean) {
        // A diagonal tile holds (i, j) and (j, i): each entry serves its own row only.
        at::Tensor gx_j = j0 != i0 ? gx : at::Tensor();
        take_out_near_pairs(in, near, tile, cols, i0, j0, gx, gx_j);
        coef.narrow(0, i0, rows).sub_(G.sum(at::IntArrayRef{1}));
        if (j0 != i0) coef.narrow(0, j0, cols).sub_(G.sum(at::IntArrayRef{0}));
      }
      gx.narrow(0, i0, rows).addmm_(G, x_j);
      if (j0 != i0) gx.narrow(0, j0, cols).addmm_(G.t(), x_i);
    }
  }
  if (in.euclidean) gx.addcmul_(in.x, coef.unsqueeze(1));
}

// ---- checks -----------------------------------------------------------------------------

void check_pair_inputs(const char* op, const at::Tensor& x, const at::Tensor& labels,
                       const at::Tensor& ref, const at::Tensor& ref_labels, int64_t distance,
                       int64_t self_offset, int64_t block_size) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(ref.dim() == 2, op, ": ref must be 2-D [M, D], got shape ", ref.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(ref.scalar_type() == x.scalar_type(), op, ": x and ref must share a dtype, got ",
                   x.scalar_type(), " and ", ref.scalar_type());
  TORCH_CHECK_VALUE(ref.size(1) == x.size(1), op, ": x [N, D] and ref [M, D] must share D, got ",
                    x.sizes(), " and ", ref.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), op,
                    ": labels must have shape [", x.size(0), "] (one per row of x), got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0), op,
                    ": ref_labels must have shape [", ref.size(0), "] (one per row of ref), got ",
                    ref_labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong, op,
                   ": labels and ref_labels must be int64, got ", labels.scalar_type(), " and ",
                   ref_labels.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && ref.device().is_cpu() && labels.device().is_cpu() &&
                  ref_labels.device().is_cpu(),
              op, ": x, labels, ref and ref_labels must be on the CPU, got ", x.device(), ", ",
              labels.device(), ", ", ref.device(), " and ", ref_labels.device());
  TORCH_CHECK_VALUE(distance == pairs::kSimilarity || distance == pairs::kEuclidean, op,
                    ": distance must be 0 (similarity) or 1 (euclidean), got ", distance);
  TORCH_CHECK_VALUE(self_offset >= -1, op,
                    ": self_offset must be -1 (no excluded column) or >= 0, got ", self_offset);
  TORCH_CHECK_VALUE(block_size >= 0, op, ": block_size must be >= 0 (0: the kernel chooses), got ",
                    block_size);
}

void check_kind(const char* op, int64_t kind, c10::ArrayRef<double> hyper) {
  TORCH_CHECK_VALUE(pairs::num_stats(kind) > 0, op,
                    ": kind must be 0 (multi-similarity), 1 (supcon / info-nce), 2 "
                    "(contrastive) or 3 (orthogonal projection), got ", kind);
  static const char* const kHyperNames[] = {"(alpha, beta, base, epsilon)", "(temperature)",
                                            "(pos_margin, neg_margin)", "(absolute)"};
  TORCH_CHECK_VALUE(static_cast<int64_t>(hyper.size()) == pairs::num_hyper(kind), op, ": kind ",
                    kind, " takes hyper = ", kHyperNames[kind], ", got ", hyper.size(), " values");
  for (const double h : hyper) {
    TORCH_CHECK_VALUE(std::isfinite(h), op, ": hyper ", kHyperNames[kind], " must be finite, got ",
                      hyper);
  }
  if (kind == pairs::kMultiSimilarity) {
    TORCH_CHECK_VALUE(hyper[0] > 0 && hyper[1] > 0, op,
                      ": multi-similarity needs alpha > 0 and beta > 0, got alpha = ", hyper[0],
                      ", beta = ", hyper[1]);
  } else if (kind == pairs::kSupCon) {
    TORCH_CHECK_VALUE(hyper[0] > 0, op, ": temperature must be > 0, got ", hyper[0]);
  } else if (kind == pairs::kOrthogonalProjection) {
    TORCH_CHECK_VALUE(hyper[0] == 0 || hyper[0] == 1, op,
                      ": orthogonal projection takes absolute = 0 or 1, got ", hyper[0]);
  }
}

void check_thresholds(const char* op, const std::optional<at::Tensor>& thresholds, int64_t kind,
                      int64_t N) {
  if (!thresholds.has_value()) return;
  TORCH_CHECK_VALUE(kind == pairs::kMultiSimilarity, op,
                    ": thresholds apply to kind 0 (multi-similarity) only, got kind ", kind);
  TORCH_CHECK_VALUE(thresholds->dim() == 2 && thresholds->size(0) == N && thresholds->size(1) == 2,
                    op, ": thresholds must have shape [", N, ", 2] (max_neg, min_pos per row), got ",
                    thresholds->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(thresholds->scalar_type()), op,
                   ": thresholds must be a floating tensor, got ", thresholds->scalar_type());
  TORCH_CHECK(thresholds->device().is_cpu(), op, ": thresholds must be on the CPU, got ",
              thresholds->device());
}

// grad_stats or stats of backward: [N, K], floating, on the CPU.
void check_stats_tensor(const char* op, const char* name, const at::Tensor& t, int64_t N,
                        int64_t K) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == K, op, ": ", name,
                    " must have shape [", N, ", ", K, "], got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(kind_object) with the kind's kernel description for `kind` and `hyper`.
template <typename acc_t, typename F>
void with_kind(int64_t kind, int64_t distance, c10::ArrayRef<double> hyper,
               const acc_t* thresholds, F&& f) {
  if (kind == pairs::kMultiSimilarity) {
    const MultiSimilarity<acc_t> ms{acc_t(hyper[0]), acc_t(hyper[1]), acc_t(hyper[2]),
                                    acc_t(hyper[3])};
    if (thresholds) {
      f(MultiSimilarityKind<acc_t, true>{ms, thresholds});
    } else {
      f(MultiSimilarityKind<acc_t, false>{ms, nullptr});
    }
  } else if (kind == pairs::kSupCon) {
    f(SupConKind<acc_t>{SupCon<acc_t>{acc_t(hyper[0])}});
  } else if (kind == pairs::kContrastive) {
    f(ContrastiveKind<acc_t>{pairs::make_contrastive(acc_t(hyper[0]), acc_t(hyper[1]), distance)});
  } else if (hyper[0] != 0) {
    f(ProjectionKind<acc_t, true>{});
  } else {
    f(ProjectionKind<acc_t, false>{});
  }
}

// ---- ops --------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> pair_extrema(const at::Tensor& x, const at::Tensor& labels,
                                                const at::Tensor& ref, const at::Tensor& ref_labels,
                                                int64_t distance, int64_t self_offset,
                                                int64_t block_size) {
  check_pair_inputs(kExtremaOp, x, labels, ref, ref_labels, distance, self_offset, block_size);
  const at::NoGradGuard no_grad;  // the inner matmuls are no part of any graph
  const int64_t N = x.size(0);
  at::Tensor values = at::empty({N, 2}, x.options().dtype(acc_type_of(x)));
  at::Tensor indices = at::empty({N, 2}, labels.options());
  const at::Tensor lab = labels.contiguous(), ref_lab = ref_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kExtremaOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<acc_t>(x, lab, ref, ref_lab, distance, self_offset);
    const Tiling tiling = choose_tiling(N, ref.size(0), block_size, in.symmetric);
    pair_extrema_kernel(in, tiling, distance, values, indices);
  });
  return {values, indices};
}

at::Tensor pair_row_stats(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                          const at::Tensor& ref_labels, const std::optional<at::Tensor>& thresholds,
                          int64_t kind, int64_t distance, c10::ArrayRef<double> hyper,
                          int64_t self_offset, int64_t block_size) {
  check_pair_inputs(kStatsOp, x, labels, ref, ref_labels, distance, self_offset, block_size);
  const at::NoGradGuard no_grad;  // the inner matmuls are no part of any graph
  check_kind(kStatsOp, kind, hyper);
  const int64_t N = x.size(0);
  check_thresholds(kStatsOp, thresholds, kind, N);
  const auto acc_type = acc_type_of(x);
  at::Tensor stats = at::empty({N, pairs::num_stats(kind)}, x.options().dtype(acc_type));
  const at::Tensor lab = labels.contiguous(), ref_lab = ref_labels.contiguous();
  const at::Tensor thr =
      thresholds.has_value() ? thresholds->to(acc_type).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kStatsOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<acc_t>(x, lab, ref, ref_lab, distance, self_offset);
    const Tiling tiling = choose_tiling(N, ref.size(0), block_size, in.symmetric);
    with_kind<acc_t>(kind, distance, hyper, thr.defined() ? thr.data_ptr<acc_t>() : nullptr,
                     [&](const auto& k) { row_stats_kernel(in, tiling, k, stats); });
  });
  return stats;
}

// When ref is x (refers_to_x) and both gradients are asked for, the whole gradient comes
// back as grad_x and grad_ref is zeros: x and ref are then one tensor, whose gradient
// autograd forms as the sum of the two. Only the sum is the contract there. (Two distinct
// tensors over the same memory, both requiring grad, would each see the sum's split
// differently; their total is still right.)
std::tuple<at::Tensor, at::Tensor> pair_row_stats_backward(
    const at::Tensor& grad_stats, const at::Tensor& stats, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const std::optional<at::Tensor>& thresholds, int64_t kind, int64_t distance,
    c10::ArrayRef<double> hyper, int64_t self_offset, int64_t block_size, bool x_grad,
    bool ref_grad) {
  check_pair_inputs(kBackwardOp, x, labels, ref, ref_labels, distance, self_offset, block_size);
  const at::NoGradGuard no_grad;  // the inner matmuls are no part of any graph
  check_kind(kBackwardOp, kind, hyper);
  const int64_t N = x.size(0), M = ref.size(0), D = x.size(1);
  check_thresholds(kBackwardOp, thresholds, kind, N);
  check_stats_tensor(kBackwardOp, "grad_stats", grad_stats, N, pairs::num_stats(kind));
  check_stats_tensor(kBackwardOp, "stats", stats, N, pairs::num_stats(kind));
  const auto acc_type = acc_type_of(x);
  const bool convert = x.scalar_type() != acc_type;
  // Gradients accumulate in the acc dtype: in the outputs themselves for fp32 / fp64, in
  // buffers converted at the end for fp16 / bf16. With no pairs at all they stay 0.
  const auto make_grad = [&](bool wanted, int64_t rows) {
    if (!wanted) return at::Tensor();
    return at::zeros({rows, D}, x.options().dtype(acc_type));
  };
  at::Tensor gx = make_grad(x_grad, N), gr = make_grad(ref_grad, M);
  const at::Tensor lab = labels.contiguous(), ref_lab = ref_labels.contiguous();
  const at::Tensor thr =
      thresholds.has_value() ? thresholds->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor g = grad_stats.to(acc_type).contiguous(), st = stats.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBackwardOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<acc_t>(x, lab, ref, ref_lab, distance, self_offset);
    const Tiling tiling = choose_tiling(N, M, block_size, in.symmetric);
    with_kind<acc_t>(kind, distance, hyper, thr.defined() ? thr.data_ptr<acc_t>() : nullptr,
                     [&](const auto& k) {
                       if (in.symmetric && x_grad && ref_grad) {
                         symmetric_backward_kernel(in, tiling, k, g, st, gx);
                       } else {
                         row_stats_backward_kernel(in, tiling, k, g, st, gx, gr);
                       }
                     });
  });
  const auto finish = [&](const at::Tensor& acc) {
    if (!acc.defined()) return at::empty({0}, x.options());
    return convert ? acc.to(x.scalar_type()) : acc;
  };
  return {finish(gx), finish(gr)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("pair_extrema", &pair_extrema);
  m.impl("pair_row_stats", &pair_row_stats);
  m.impl("pair_row_stats_backward", &pair_row_stats_backward);
}

}  // namespace cpu
}  // namespace fusedloss
