// Reading token masks of any torch dtype without converting them first (shared by the loss kernels).
#pragma once

#include "fastalign/common.h"

namespace fastalign {

// Masks are read as unsigned integers of their width (1, 2, 4 or 8 bytes). An element keeps its token when it
// is nonzero as a number, like `mask != 0`: any set bit for bool and integer masks, any bit but the sign for
// floating-point masks (-0.0 drops the token like 0.0, NaN keeps it).
// Widths outside 1 to 8 bytes give all bits, without an out-of-range shift; the launchers reject them.
FA_HD uint64_t mask_value_bits(int mask_bytes, bool mask_is_float) {
  const uint64_t all = mask_bytes <= 0 || mask_bytes >= 8 ? ~0ull : (1ull << (8 * mask_bytes)) - 1ull;
  return mask_is_float ? all >> 1 : all;
}

template <typename Bits>
FA_HD bool mask_keeps(Bits raw, Bits value_bits) {
  return (raw & value_bits) != 0;
}

// Element `index` of a mask of `bytes`-wide elements.
FA_HD bool mask_keeps_at(const void* mask, int64_t index, int bytes, bool is_float) {
  const uint64_t value_bits = mask_value_bits(bytes, is_float);
  switch (bytes) {
    case 1:
      return mask_keeps<uint8_t>(static_cast<const uint8_t*>(mask)[index], static_cast<uint8_t>(value_bits));
    case 2:
      return mask_keeps<uint16_t>(static_cast<const uint16_t*>(mask)[index], static_cast<uint16_t>(value_bits));
    case 4:
      return mask_keeps<uint32_t>(static_cast<const uint32_t*>(mask)[index], static_cast<uint32_t>(value_bits));
    default:
      return mask_keeps<uint64_t>(static_cast<const uint64_t*>(mask)[index], value_bits);
  }
}

}  // namespace fastalign
