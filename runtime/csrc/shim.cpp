// hasten's C++ shim: the few libtorch calls tch does not expose, compiled against the same libtorch
// headers tch uses. Each function catches every exception; failures come back as -1.
//
// Autocast: tch can only switch CUDA autocast on with libtorch's default dtype (fp16). Accelerate needs
// bf16 as well, and CPU autocast, so we set the device type's enabled flag and dtype ourselves.

#include <ATen/autocast_mode.h>

namespace {
c10::DeviceType device_type(int device) {
  return device == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}
}  // namespace

extern "C" {

int hasten_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_set_enabled(int device, int enabled) {
  try {
    at::autocast::set_autocast_enabled(device_type(device), enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_get_dtype(int device) {
  try {
    return static_cast<int>(at::autocast::get_autocast_dtype(device_type(device)));
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_set_dtype(int device, int scalar_type) {
  try {
    at::autocast::set_autocast_dtype(device_type(device), static_cast<at::ScalarType>(scalar_type));
    return 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_increment_nesting() {
  try {
    return at::autocast::increment_nesting();
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_decrement_nesting() {
  try {
    return at::autocast::decrement_nesting();
  } catch (...) {
    return -1;
  }
}

void hasten_autocast_clear_cache() {
  try {
    at::autocast::clear_cache();
  } catch (...) {
  }
}

}  // extern "C"
