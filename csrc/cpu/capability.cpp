// Which instruction-set path the CPU kernels run (see cpu/kernels.h): the best one this CPU supports,
// unless SER_LIGHTNING_CPU_CAPABILITY names another (read once, on first use, which the Python
// package triggers when it loads the library), or set_capability() changes it (tests, benchmarks).
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

namespace ser_lightning::cpu {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SL_X86_PATHS 1
extern const IsaTable kAvx512Table;
extern const IsaTable kAvx2Table;
#endif
extern const IsaTable kBaselineTable;

namespace {

constexpr const char* kEnvVar = "SER_LIGHTNING_CPU_CAPABILITY";

const IsaTable& table(Capability capability) {
  switch (capability) {
#ifdef SL_X86_PATHS
    case Capability::kAvx512: return kAvx512Table;
    case Capability::kAvx2: return kAvx2Table;
#endif
    default: return kBaselineTable;
  }
}

std::string known_names() {
  std::string names;
  for (Capability c : compiled_capabilities()) names += std::string(names.empty() ? "" : ", ") + capability_name(c);
  return names;
}

std::optional<Capability> parse(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (Capability c : compiled_capabilities())
    if (name == capability_name(c)) return c;
  return std::nullopt;
}

Capability best_supported() {
  for (Capability c : compiled_capabilities())
    if (cpu_supports(c)) return c;
  return Capability::kDefault;
}

Capability initial_capability() {
  const char* requested = std::getenv(kEnvVar);
  const Capability best = best_supported();
  if (requested == nullptr || *requested == '\0') return best;
  const std::optional<Capability> parsed = parse(requested);
  if (!parsed) {
    TORCH_WARN(kEnvVar, "=", requested, " is not one of the compiled paths (", known_names(), "); using ",
               capability_name(best));
    return best;
  }
  if (!cpu_supports(*parsed)) {
    TORCH_WARN(kEnvVar, "=", requested, ": this CPU does not support it; using ", capability_name(best));
    return best;
  }
  return *parsed;
}

std::atomic<int>& active() {
  static std::atomic<int> value{static_cast<int>(initial_capability())};
  return value;
}

}  // namespace

const char* capability_name(Capability capability) {
  switch (capability) {
    case Capability::kAvx512: return "avx512";
    case Capability::kAvx2: return "avx2";
    default: return "default";
  }
}

std::vector<Capability> compiled_capabilities() {
#ifdef SL_X86_PATHS
  return {Capability::kAvx512, Capability::kAvx2, Capability::kDefault};
#else
  return {Capability::kDefault};
#endif
}

bool cpu_supports(Capability capability) {
#ifdef SL_X86_PATHS
  __builtin_cpu_init();  // may run before libgcc's own initialiser
  switch (capability) {
    case Capability::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Capability::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return capability == Capability::kDefault;
#endif
}

Capability active_capability() { return static_cast<Capability>(active().load(std::memory_order_relaxed)); }

void set_capability(const std::string& name) {
  const std::optional<Capability> parsed = parse(name);
  TORCH_CHECK(parsed.has_value(), "set_cpu_capability: `name` must be one of the compiled paths (", known_names(),
              "), got '", name, "'");
  TORCH_CHECK(cpu_supports(*parsed), "set_cpu_capability: this CPU does not support `name`='", name, "'");
  active().store(static_cast<int>(*parsed), std::memory_order_relaxed);
}

template <typename T>
const IsaKernels<T>& isa_kernels(Capability capability) {
  if constexpr (std::is_same_v<T, float>) {
    return table(capability).f32;
  } else {
    return table(capability).f64;
  }
}

template const IsaKernels<float>& isa_kernels<float>(Capability);
template const IsaKernels<double>& isa_kernels<double>(Capability);

}  // namespace ser_lightning::cpu
