// nn_topk on the CPU: each query's k most similar queue entries not carrying its own id, in rank order (similarity
// descending, NaN first as in the reference's sort; ties: lower queue index first), in the kernel-level form of
// vitfast/ops/nn_topk.py, without the [B, Q] similarities.
//
// Work item = (query tile I, chunk of queue tiles) (common.h: ChunkGrid). Per queue tile J one single-threaded BLAS
// GEMM S[Tb, Tq] = queries[I] queue[J]^T fills a per-thread buffer; then every query row is scanned against its bounded
// list of the best entries so far (k (value, index) pairs, sorted): once the list is full an entry costs one compare
// with the list's last value, and only the rare entry that beats it has its id checked and is inserted. The chunks'
// lists are merged per query in chunk order. The ranking is a strict total order, so the result is unique; the chunks
// follow from the problem size, not the thread count, so even the similarity bits are the same for any thread count.
// Scratch: O(chunks B k) lists plus the tiles. queries are widened to the accumulation type once (O(B d)), an
// fp16/bf16 queue one tile at a time. Similarities accumulate in fp32 (fp64 for fp64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace vitfast {
namespace {

using cpu::gemm;

// Similarity tiles of Tb x Tq = 256 queries x 512 queue entries (512 KB in fp32) stay in L2 between the GEMM and the
// scan of its rows.
constexpr int64_t kQueryTile = 256;
constexpr int64_t kQueueTile = 512;
// (query tile, queue chunk) items: about this many, so that a few hundred queries still give every thread work.
constexpr int64_t kTargetItems = 16;

// The rank order of similarities, as the reference's descending sort has it: NaN above everything (NaNs tie), then
// by value (-0 ties with +0; equal values are ordered by index by the caller).
template <typename T>
inline bool ranks_above(T a, T b) {
  return a != a ? b == b : a > b;
}

// One query's best entries so far: count of them (<= k), sorted by value descending, ties by index ascending.
template <typename T>
struct Best {
  T* value;        // [k]
  int64_t* index;  // [k]
  int32_t* count;
  int32_t k;

  bool full() const { return *count == k; }
  // Whether (v, an index above every index held) would enter the list.
  bool admits(T v) const { return !full() || ranks_above(v, value[k - 1]); }
  // Inserts (v, q), where q is larger than every index held: it goes after the entries of equal value. When the list
  // is full the caller has checked admits(v); the last entry is dropped.
  void insert(T v, int64_t q) {
    int32_t p = *count < k ? (*count)++ : k - 1;
    for (; p > 0 && ranks_above(v, value[p - 1]); --p) {
      value[p] = value[p - 1];
      index[p] = index[p - 1];
    }
    value[p] = v;
    index[p] = q;
  }
};

// Offers the similarities s [cols] of queue entries col0 .. col0 + cols - 1 (ids [cols]) to the list of a query with
// id `own`. Entries come in increasing index order, after every index the list holds.
template <typename T>
void scan_row(Best<T> best, const T* s, const int64_t* ids, int64_t own, int64_t col0, int64_t cols) {
  int64_t c = 0;
  for (; c < cols && !best.full(); ++c) {
    if (ids[c] != own) best.insert(s[c], col0 + c);
  }
  if (c == cols) return;
  T threshold = best.value[best.k - 1];
  for (; c < cols; ++c) {
    // One compare per entry: !(s <= threshold) lets through every entry that ranks above the threshold (NaNs too),
    // and is rarely true once the list holds good entries.
    if (!(s[c] <= threshold) && ranks_above(s[c], threshold) && ids[c] != own) {
      best.insert(s[c], col0 + c);
      threshold = best.value[best.k - 1];
    }
  }
}

template <typename T, typename S>
std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& queries_in, const at::Tensor& queue_in,
                                             const at::Tensor& query_ids_in, const at::Tensor& queue_ids_in,
                                             int32_t k) {
  const at::Tensor queries = cpu::as_acc<T>(queries_in), queue = queue_in.contiguous();
  const at::Tensor query_ids = query_ids_in.contiguous(), queue_ids = queue_ids_in.contiguous();
  const int64_t n_queries = queries.size(0), n_queue = queue.size(0), dim = queries.size(1);
  at::Tensor values = at::empty({n_queries, k}, queries.options());
  at::Tensor indices = at::empty({n_queries, k}, queries.options().dtype(at::kLong));
  if (n_queries == 0) return {values, indices};
  const bool blas = cpu::blas_available(queries.scalar_type());
  const T* qp = queries.const_data_ptr<T>();
  const S* queue_p = queue.const_data_ptr<S>();
  const int64_t* query_id = query_ids.const_data_ptr<int64_t>();
  const int64_t* queue_id = queue_ids.const_data_ptr<int64_t>();
  const cpu::ChunkGrid grid = cpu::chunk_grid(n_queries, kQueryTile, n_queue, kQueueTile, kTargetItems);
  // Chunk c's list of query b: part_value / part_index [(c * B + b) * k ...], part_count [c * B + b].
  const int64_t lists = grid.chunks * n_queries;
  const cpu::Buffer<T> part_value(lists * k);
  const cpu::Buffer<int64_t> part_index(lists * k);
  const cpu::Buffer<int32_t> part_count(lists, 0.0);
  const auto list = [&](int64_t at) {
    return Best<T>{part_value.data + at * k, part_index.data + at * k, part_count.data + at, k};
  };
  at::parallel_for(0, grid.items(), 1, [&](int64_t w0, int64_t w1) {
    const cpu::Buffer<T> s(grid.rows.rows * kQueueTile), widened(std::is_same_v<S, T> ? 0 : kQueueTile * dim);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t chunk = w % grid.chunks, row0 = (w / grid.chunks) * grid.rows.rows;
      const int64_t rows = std::min(grid.rows.rows, n_queries - row0);
      for (int64_t col0 = grid.chunk_begin(chunk); col0 < grid.chunk_begin(chunk + 1); col0 += kQueueTile) {
        const int64_t cols = std::min(kQueueTile, n_queue - col0);
        const T* tile = cpu::widened(queue_p + col0 * dim, cols * dim, widened.data);
        gemm<T>(blas, false, true, rows, cols, dim, T(1), qp + row0 * dim, dim, tile, dim, T(0), s.data, kQueueTile);
        for (int64_t r = 0; r < rows; ++r) {
          scan_row(list(chunk * n_queries + row0 + r), s.data + r * kQueueTile, queue_id + col0,
                   query_id[row0 + r], col0, cols);
        }
      }
    }
  });
  // Merge per query in chunk order: chunk c's indices all exceed the earlier chunks', as insert() wants; a chunk's
  // list is sorted, so its first entry that does not make it ends that chunk.
  T* value_p = values.data_ptr<T>();
  int64_t* index_p = indices.data_ptr<int64_t>();
  const cpu::Buffer<int32_t> found(n_queries, 0.0);
  at::parallel_for(0, n_queries, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Best<T> best{value_p + b * k, index_p + b * k, found.data + b, k};
      for (int64_t c = 0; c < grid.chunks; ++c) {
        const Best<T> part = list(c * n_queries + b);
        for (int32_t i = 0; i < *part.count; ++i) {
          if (!best.admits(part.value[i])) break;
          best.insert(part.value[i], part.index[i]);
        }
      }
    }
  });
  for (int64_t b = 0; b < n_queries; ++b) {
    TORCH_CHECK(found.data[b] == k, "nn_topk: query ", b, " has ", found.data[b],
                " eligible queue entries, fewer than k = ", k);
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> nn_topk(const at::Tensor& queries, const at::Tensor& queue,
                                           const at::Tensor& query_ids, const at::Tensor& queue_ids, int64_t k) {
  TORCH_CHECK(queries.dim() == 2, "queries must be [B, d], got ", queries.sizes());
  TORCH_CHECK(queue.dim() == 2 && queue.size(1) == queries.size(1) && queue.scalar_type() == queries.scalar_type(),
              "queue must be [Q, d] in queries' dtype with d = ", queries.size(1), ", got ", queue.scalar_type(), " ",
              queue.sizes());
  TORCH_CHECK(query_ids.scalar_type() == at::kLong && query_ids.dim() == 1 && query_ids.size(0) == queries.size(0),
              "query_ids must be int64 [B] = [", queries.size(0), "], got ", query_ids.scalar_type(), " ",
              query_ids.sizes());
  TORCH_CHECK(queue_ids.scalar_type() == at::kLong && queue_ids.dim() == 1 && queue_ids.size(0) == queue.size(0),
              "queue_ids must be int64 [Q] = [", queue.size(0), "], got ", queue_ids.scalar_type(), " ",
              queue_ids.sizes());
  TORCH_CHECK(k >= 1 && k <= queue.size(0), "k must be in [1, Q] = [1, ", queue.size(0), "], got ", k);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "nn_topk", [&] {
    result = topk_impl<at::opmath_type<scalar_t>, scalar_t>(queries, queue, query_ids, queue_ids,
                                                             static_cast<int32_t>(k));
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) { m.impl("nn_topk", &nn_topk); }

}  // namespace vitfast
