// What the AMX kernels share (amx_gemm.cpp, paged_attention_amx.cpp): whether this build has
// AMX tiles (PARASERVE_AMX) and the tile configuration LDTILECFG reads.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define PARASERVE_AMX 1
#include <immintrin.h>

namespace paraserve {
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace amx
}  // namespace paraserve
#endif
