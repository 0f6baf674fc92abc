// The AVX-512 path (x86-64-v4): 16 floats per register, 32 registers, 8 positions in flight.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SL_ISA_AVX512
#include "cpu/isa_kernels.h"

namespace ser_lightning::cpu {
extern const IsaTable kAvx512Table;
const IsaTable kAvx512Table = {avx512::make_kernels<float>(), avx512::make_kernels<double>()};
}  // namespace ser_lightning::cpu
#endif
