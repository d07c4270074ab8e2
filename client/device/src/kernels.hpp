// Faster kernels than the portable ones the ExecuTorch wheel ships, for some operators
// (see kernels.cpp); handed to each loaded method.
#pragma once

#include <vector>

#include <executorch/runtime/kernel/operator_registry.h>

namespace fedge {

std::vector<executorch::runtime::Kernel> fast_kernels();

}  // namespace fedge
