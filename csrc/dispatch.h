// Dtype dispatch and argument-check helpers shared by every op.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

// float32, float16 and bfloat16: the dtypes every op accepts for activations.
// (float64 is not one: the argument checks refuse it, so no kernel is instantiated for it.)
#define SNAPKV_DISPATCH_FLOATING(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// A user-facing check: the message should say which argument and what was expected.
#define SNAPKV_CHECK(cond, ...) TORCH_CHECK(cond, "snapkv: ", __VA_ARGS__)
