// Error messages for the ops' argument checks, formatted without iostreams.
//
// On the CUDA build run on the H200 (torch 2.11, cu130), every TORCH_CHECK of ours whose message held a number (a
// shape, a count, a value) killed the process with SIGSEGV instead of raising, while one whose message held only
// strings raised ValueError (benchmarks/diagnose_op_errors.py). c10::str streams each argument into an
// std::ostringstream, and a number goes through the stream's locale; ATen's own checks, compiled with torch, were
// unaffected. So each check here builds its message as one std::string (std::to_string, snprintf), and TORCH_CHECK
// passes a single string through without a stream:
//   TORCH_CHECK_VALUE(cond, message("x has ", x.dim(), " dims, shape ", x.sizes()));
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace diffusion_fast {

inline std::string message_part(const char* s) { return s; }
inline std::string message_part(const std::string& s) { return s; }
inline std::string message_part(const c10::Device& d) { return d.str(); }
inline std::string message_part(c10::ScalarType t) { return c10::toString(t); }
inline std::string message_part(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
std::string message_part(T v) {
  return std::to_string(v);
}
template <typename T, typename std::enable_if<std::is_floating_point<T>::value, int>::type = 0>
std::string message_part(T v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", static_cast<double>(v));
  return buffer;
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  int expand[] = {0, (out += message_part(parts), 0)...};
  (void)expand;
  return out;
}

}  // namespace diffusion_fast
