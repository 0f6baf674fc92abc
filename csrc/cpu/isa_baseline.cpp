// The "default" path: the target's baseline instruction set, with no machine flags. SSE2 on x86-64
// (4 floats per register, 16 registers, no FMA), NEON on aarch64 (4 floats, 32 registers, FMA),
// portable scalar code elsewhere.
#define SL_ISA_BASELINE
#include "cpu/isa_kernels.h"

namespace ser_lightning::cpu {
extern const IsaTable kBaselineTable;
const IsaTable kBaselineTable = {baseline::make_kernels<float>(), baseline::make_kernels<double>()};
}  // namespace ser_lightning::cpu
