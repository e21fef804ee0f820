// Column sums over the rows of a tensor in float32, by shards of rows on TensorFlow's
// CPU thread pool: a fixed number of shards, each summing its rows in order into its
// own vector, then the shards' vectors added in order (the same result whatever the
// threads did). For bias gradients: dbias = dy (or a function of it) summed over rows.

#ifndef AUDIO_TRANSFORMER_NATIVE_SHARDS_H_
#define AUDIO_TRANSFORMER_NATIVE_SHARDS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorflow/core/platform/threadpool.h"

namespace audio_transformer_native {

// out[0:n] = the sums of every shard; rows_fn(begin, end, sum) processes rows
// [begin, end) and adds each row's n values into sum (float[n], zeroed per shard).
// cost_per_row: the cost model's estimate for one row (ParallelFor's units).
template <typename RowsFn>
void SumRowsByShard(tensorflow::thread::ThreadPool* pool, int64_t rows, int64_t n,
                    int64_t cost_per_row, float* out, RowsFn rows_fn) {
  std::fill(out, out + n, 0.0f);
  if (rows <= 0 || n <= 0) return;
  const int64_t shards = std::min<int64_t>(rows, 4 * (pool->NumThreads() + 1));
  const int64_t per = (rows + shards - 1) / shards;
  std::vector<float> partial(shards * n, 0.0f);
  pool->ParallelFor(shards, per * cost_per_row, [&](int64_t begin, int64_t end) {
    for (int64_t shard = begin; shard < end; ++shard)
      rows_fn(shard * per, std::min(rows, (shard + 1) * per), partial.data() + shard * n);
  });
  for (int64_t shard = 0; shard < shards; ++shard)
    for (int64_t i = 0; i < n; ++i) out[i] += partial[shard * n + i];
}

}  // namespace audio_transformer_native

#endif  // AUDIO_TRANSFORMER_NATIVE_SHARDS_H_
