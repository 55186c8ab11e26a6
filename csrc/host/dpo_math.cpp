#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastalign/mask.h"
#include "fastalign/dpo_math.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

namespace fastalign {
namespace {

void check_same_size(const FloatArray& first, const FloatArray& other, const char* name) {
  if (other.size() != first.size())
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(first.size()) + " elements, got " +
                                std::to_string(other.size()));
}

py::tuple terms_arrays(py::ssize_t n, const std::vector<dpo::Terms>& terms) {
  FloatArray loss(n), d_chosen(n), d_rejected(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    loss.mutable_data()[i] = terms[i].loss;
    d_chosen.mutable_data()[i] = terms[i].d_chosen;
    d_rejected.mutable_data()[i] = terms[i].d_rejected;
  }
  return py::make_tuple(loss, d_chosen, d_rejected);
}

template <typename Bits>
void mask_keeps_as(const uint8_t* raw, py::ssize_t count, bool mask_is_float, bool* out) {
  const Bits value_bits = static_cast<Bits>(mask_value_bits(sizeof(Bits), mask_is_float));
  for (py::ssize_t i = 0; i < count; ++i) {
    Bits element;
    std::memcpy(&element, raw + i * sizeof(Bits), sizeof(Bits));
    out[i] = mask_keeps(element, value_bits);
  }
}

}  // namespace

void register_dpo_math(py::module_& m) {
  m.def(
      "dpo_type_terms",
      [](int loss_type, FloatArray chosen_logratios, FloatArray rejected_logratios, float beta, float label_smoothing,
         float discopop_tau) {
        if (loss_type < 0 || loss_type >= dpo::kNumLossTypes)
          throw std::invalid_argument("loss_type must be an index of DPO_LOSS_TYPES (0 to 11), got " +
                                      std::to_string(loss_type));
        check_same_size(chosen_logratios, rejected_logratios, "rejected_logratios");
        const dpo::Options options{beta, label_smoothing, discopop_tau};
        std::vector<dpo::Terms> terms(chosen_logratios.size());
        for (py::ssize_t i = 0; i < chosen_logratios.size(); ++i)
          terms[i] = dpo::type_terms(loss_type, chosen_logratios.data()[i], rejected_logratios.data()[i], options);
        return terms_arrays(chosen_logratios.size(), terms);
      },
      py::arg("loss_type"), py::arg("chosen_logratios"), py::arg("rejected_logratios"), py::arg("beta"),
      py::arg("label_smoothing"), py::arg("discopop_tau"),
      "(loss, d loss / d chosen log-ratio, d loss / d rejected log-ratio) of one DPO loss type, per pair");
  m.def(
      "dpo_pair_terms",
      [](FloatArray chosen_sums, FloatArray rejected_sums, FloatArray chosen_lengths, FloatArray rejected_lengths,
         FloatArray ref_chosen, FloatArray ref_rejected, unsigned types, unsigned averaged,
         const std::vector<float>& type_weights, float beta, float label_smoothing, float discopop_tau) {
        check_same_size(chosen_sums, rejected_sums, "rejected_sums");
        check_same_size(chosen_sums, chosen_lengths, "chosen_lengths");
        check_same_size(chosen_sums, rejected_lengths, "rejected_lengths");
        check_same_size(chosen_sums, ref_chosen, "ref_chosen");
        check_same_size(chosen_sums, ref_rejected, "ref_rejected");
        if (type_weights.size() != dpo::kNumLossTypes)
          throw std::invalid_argument("type_weights must hold one weight per DPO loss type (12), got " +
                                      std::to_string(type_weights.size()));
        dpo::Weights weights{};
        for (int kind = 0; kind < dpo::kNumLossTypes; ++kind) weights.w[kind] = type_weights[kind];
        const dpo::Options options{beta, label_smoothing, discopop_tau};
        std::vector<dpo::Terms> terms(chosen_sums.size());
        for (py::ssize_t i = 0; i < chosen_sums.size(); ++i) {
          const dpo::PairRows rows{chosen_sums.data()[i],    rejected_sums.data()[i], chosen_lengths.data()[i],
                                   rejected_lengths.data()[i], ref_chosen.data()[i],    ref_rejected.data()[i]};
          terms[i] = dpo::pair_terms(rows, types, averaged, weights, options);
        }
        return terms_arrays(chosen_sums.size(), terms);
      },
      py::arg("chosen_sums"), py::arg("rejected_sums"), py::arg("chosen_lengths"), py::arg("rejected_lengths"),
      py::arg("ref_chosen"), py::arg("ref_rejected"), py::arg("types"), py::arg("averaged"), py::arg("type_weights"),
      py::arg("beta"), py::arg("label_smoothing"), py::arg("discopop_tau"),
      "(weighted loss, d loss / d chosen token log-prob, d loss / d rejected token log-prob) per pair, from the "
      "rows' sums, lengths and reference sums: what the forward kernel's thread 0 computes");
  m.def(
      "dpo_mask_keeps",
      [](ByteArray raw, int mask_bytes, bool mask_is_float) {
        if (mask_bytes != 1 && mask_bytes != 2 && mask_bytes != 4 && mask_bytes != 8)
          throw std::invalid_argument("mask_bytes must be 1, 2, 4 or 8, got " + std::to_string(mask_bytes));
        if (raw.size() % mask_bytes != 0)
          throw std::invalid_argument("raw must hold whole mask elements of mask_bytes bytes each");
        const py::ssize_t count = raw.size() / mask_bytes;
        py::array_t<bool> out(count);
        switch (mask_bytes) {
          case 1:
            mask_keeps_as<uint8_t>(raw.data(), count, mask_is_float, out.mutable_data());
            break;
          case 2:
            mask_keeps_as<uint16_t>(raw.data(), count, mask_is_float, out.mutable_data());
            break;
          case 4:
            mask_keeps_as<uint32_t>(raw.data(), count, mask_is_float, out.mutable_data());
            break;
          default:
            mask_keeps_as<uint64_t>(raw.data(), count, mask_is_float, out.mutable_data());
        }
        return out;
      },
      py::arg("raw"), py::arg("mask_bytes"), py::arg("mask_is_float"),
      "Whether each mask element (the bytes of mask_bytes-wide elements) keeps its token, as the kernels read it");
}

}  // namespace fastalign
