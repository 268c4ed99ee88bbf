// Shared by the C++ entry files, the CPU kernels and the CUDA launchers; no torch headers here
// so that .cu files compile quickly.
#pragma once
#include <cstdint>

namespace ehm {

// Element types the kernels instantiate for.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

}  // namespace ehm
