// Multi-tensor apply: one kernel launch walks many tensors, one CUDA block per (tensor, chunk).
#pragma once

#include <vector>

#include "../stable.h"

namespace fastft {
namespace cuda {

// NOTE [chunking]: every tensor is cut into chunks of kChunkSize elements and each block handles one
// chunk. The kernel argument struct holds at most kMaxTensors addresses per list and kMaxBlocks
// (tensor, chunk) pairs (it must stay under the 4 KiB kernel-parameter limit); when either fills,
// the kernel is launched and filling starts again, the tensor cut in the middle carrying over.
// Chunk offsets are int64 (a tensor may pass 2^31 elements); indices inside a chunk fit in int.
constexpr int kChunkSize = 65536;
constexpr int kBlockSize = 512;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

template <int depth>
struct TensorListMeta {
  void* addresses[depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  float* steps[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int first_block;  // global index of this launch's block 0 (for per-block outputs)
};

// lists[d][t] is tensor t of list d; an empty list d puts nullptr in its slots. `steps` may be empty.
// `launch(meta, num_blocks)` launches the kernel on the current stream.
template <int depth, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<Tensor>>& lists, const std::vector<Tensor>& steps,
                        Launch&& launch) {
  STD_TORCH_CHECK(static_cast<int>(lists.size()) == depth, "fastft: multi_tensor_apply<", depth, "> got ",
                  lists.size(), " lists");
  const auto& ref = lists[0];
  const int64_t n_tensors = static_cast<int64_t>(ref.size());
  TensorListMeta<depth> meta{};
  int loaded = 0;
  int blocks = 0;
  int total_blocks = 0;
  meta.first_block = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = ref[t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < depth; ++d)
      meta.addresses[d][loaded] = lists[d].empty() ? nullptr : lists[d][t].mutable_data_ptr();
    meta.numel[loaded] = numel;
    meta.steps[loaded] = steps.empty() ? nullptr : static_cast<float*>(steps[t].mutable_data_ptr());
    ++loaded;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(loaded - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool blocks_full = blocks == kMaxBlocks;
      const bool tensors_full = loaded == kMaxTensors && last_chunk;
      if (blocks_full || tensors_full) {
        launch(meta, blocks);
        total_blocks += blocks;
        meta.first_block = total_blocks;
        blocks = 0;
        if (last_chunk) {
          loaded = 0;
        } else {
          // The current tensor carries over into slot 0 of the next launch.
          for (int d = 0; d < depth; ++d) meta.addresses[d][0] = meta.addresses[d][loaded - 1];
          meta.numel[0] = meta.numel[loaded - 1];
          meta.steps[0] = meta.steps[loaded - 1];
          loaded = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks);
}

inline int64_t count_chunks(const std::vector<Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += (t.numel() + kChunkSize - 1) / kChunkSize;
  return n;
}

}  // namespace cuda
}  // namespace fastft
