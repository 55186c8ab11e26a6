#include <pybind11/pybind11.h>


namespace fastalign {
void register_policy_math(pybind11::module_&) {}
}  // namespace fastalign
