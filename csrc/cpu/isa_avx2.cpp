// The AVX2 + FMA path (x86-64-v3): 8 floats per register, 16 registers, 4 positions in flight.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SL_ISA_AVX2
#include "cpu/isa_kernels.h"

namespace ser_lightning::cpu {
extern const IsaTable kAvx2Table;
const IsaTable kAvx2Table = {avx2::make_kernels<float>(), avx2::make_kernels<double>()};
}  // namespace ser_lightning::cpu
#endif
