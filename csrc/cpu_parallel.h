// at::parallel_for for the CPU kernels, with a build-time guard.
//
// ATen's parallel_for is a header template: under torch's OpenMP backend it only splits work
// across threads when the including file is compiled with -fopenmp. Without the flag it quietly
// runs every loop on one thread, so this refuses to compile instead.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "torch uses OpenMP for at::parallel_for: compile the snapkv CPU kernels with -fopenmp"
#endif
