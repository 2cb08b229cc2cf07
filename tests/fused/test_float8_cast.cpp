// titan/fused/float8_cast.hpp: titan::float8_cast against a scalar C++ computation of the same
// formula (titan_test::float8_cast_reference: no ATen kernel), bit for bit in data, scale and its
// inverse: hp in fp32, bf16, fp16 and fp64; e4m3fn and e5m2; scales as they are and rounded to
// powers of two; one amax, one per row, one per column, in hp's dtype and in fp32; hp contiguous, a
// weight's transpose and a column slice; saturation, a row of zeros and a NaN (NaN where the
// reference has one, its sign aside: ATen's vectorized CPU kernels set it). Where titan's CUDA
// kernels run (the GPU kit) the kernel is checked the same way. titan::float8_cast_transpose: the
// same bits in each layout asked for (row-major, column-major, both). Then the errors.
#include "fused_testing.hpp"

#include <optional>
#include <string>
#include <vector>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// hp [rows, cols] laid out as `layout` says: contiguous, the transpose of a contiguous [cols, rows]
/// (a weight's Wᵀ), or the first cols columns of a wider tensor (rows strided); N(0, 3²) values with
/// row 1 all zeros and, when `nan`, a NaN at (2, 3).
enum class Layout { Contiguous, Transposed, ColumnSlice };
Tensor hp_of(torch::Dtype dtype, Layout layout, int64_t rows, int64_t cols, bool nan) {
  Tensor hp = layout == Layout::Transposed    ? torch::randn({cols, rows}, torch::kDouble).t()
              : layout == Layout::ColumnSlice ? torch::randn({rows, cols + 8}, torch::kDouble).narrow(1, 0, cols)
                                              : torch::randn({rows, cols}, torch::kDouble);
  hp.mul_(3);
  hp.select(0, 1).zero_();
  if (nan) hp.index_put_({2, 3}, std::nan(""));
  const auto typed = hp.to(dtype).to(device());  // keeps hp's strides where it is dense
  if (layout != Layout::ColumnSlice) return typed;
  return torch::empty({rows, cols + 8}, typed.options()).narrow(1, 0, cols).copy_(typed);  // rows cols + 8 apart
}

}  // namespace

TEST_CASE("fused float8_cast: data and scale are the bits of the scalar computation, in every layout") {
  for (const auto hp_dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble})
    for (const auto dtype : {at::kFloat8_e4m3fn, at::kFloat8_e5m2})
      for (const bool power_of_2 : {false, true})
        for (const auto layout : {Layout::Contiguous, Layout::Transposed, Layout::ColumnSlice})
          for (const std::optional<int64_t> dim : {std::optional<int64_t>(), std::optional<int64_t>(1),
                                                   std::optional<int64_t>(0)})
            for (const bool fp32_amax : {false, true}) {
              CAPTURE(hp_dtype);
              CAPTURE(dtype);
              CAPTURE(power_of_2);
              CAPTURE(static_cast<int>(layout));
              CAPTURE(dim.value_or(-1));
              CAPTURE(fp32_amax);
              torch::manual_seed(11);
              // A NaN only where one amax entry holds it (per row), else every scale would be NaN.
              const bool nan = dim == 1;
              const auto hp = hp_of(hp_dtype, layout, 24, 40, nan);  // [24, 40]
              auto amax = titan_test::float8_amax(hp, dim, /*shrink=*/1.5);  // saturates the largest values
              if (fp32_amax) amax = amax.to(torch::kFloat);
              const auto [data, scale, inverse] = titan::float8_cast(hp, amax, dtype, power_of_2);
              const auto [data_want, scale_want, inverse_want] =
                  titan_test::float8_cast_reference(hp, amax, dtype, power_of_2);
              REQUIRE((data.scalar_type() == dtype));
              REQUIRE((scale.scalar_type() == torch::kFloat));
              CHECK(data.sizes() == hp.sizes());
              CHECK(scale.sizes() == amax.sizes());
              CHECK(inverse.sizes() == amax.sizes());
              if (hp.is_non_overlapping_and_dense()) CHECK(data.strides() == hp.strides());  // Wᵀ stays one
              CHECK(titan_test::same_bits_or_nan(data, data_want));
              CHECK(titan_test::same_bits_or_nan(scale, scale_want));
              CHECK(titan_test::same_bits_or_nan(inverse, inverse_want));
              // The largest elements saturate at ±float8_max (scales not rounded down); row 1, zeros,
              // stays zeros; the NaN stays NaN.
              const auto values = data.to(torch::kFloat).cpu();
              if (!power_of_2)
                CHECK(values.abs().nan_to_num(0).max().item<double>() == titan::detail::float8_max(dtype));
              CHECK(values.select(0, 1).eq(0).all().item<bool>());
              if (nan) CHECK(std::isnan(values.index({2, 3}).item<float>()));
            }
}

TEST_CASE("fused float8_cast_transpose: each layout asked for holds the bits of the scalar computation") {
  // Tiles of 64 x 64 in titan's CUDA kernel: [72, 104] read in 16-byte packs (multiples of 8),
  // [70, 100] element by element; the last tiles partial.
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{72, 104}, {70, 100}})
    for (const auto hp_dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble})
      for (const auto layout : {Layout::Contiguous, Layout::Transposed, Layout::ColumnSlice})
        for (const std::optional<int64_t> dim : {std::optional<int64_t>(), std::optional<int64_t>(1),
                                                 std::optional<int64_t>(0)})
          for (const auto& [row_major, column_major] : {std::pair{true, false}, {false, true}, {true, true}}) {
            CAPTURE(rows);
            CAPTURE(hp_dtype);
            CAPTURE(static_cast<int>(layout));
            CAPTURE(dim.value_or(-1));
            CAPTURE(row_major);
            CAPTURE(column_major);
            torch::manual_seed(12);
            const bool nan = dim == 1;
            const auto hp = hp_of(hp_dtype, layout, rows, cols, nan);  // [rows, cols]
            const auto amax = titan_test::float8_amax(hp, dim, /*shrink=*/1.5);
            const auto [data_rows, data_columns, scale, inverse] =
                titan::float8_cast_transpose(hp, amax, at::kFloat8_e4m3fn, false, row_major, column_major);
            const auto [data_want, scale_want, inverse_want] =
                titan_test::float8_cast_reference(hp, amax, at::kFloat8_e4m3fn, false);
            REQUIRE(data_rows.defined() == row_major);
            REQUIRE(data_columns.defined() == column_major);
            if (row_major) {
              CHECK(data_rows.is_contiguous());
              CHECK(titan_test::same_bits_or_nan(data_rows, data_want));
            }
            if (column_major) {
              CHECK(data_columns.sizes() == hp.sizes());
              CHECK(data_columns.t().is_contiguous());  // strides [1, rows]
              CHECK(titan_test::same_bits_or_nan(data_columns, data_want));
            }
            CHECK(titan_test::same_bits_or_nan(scale, scale_want));
            CHECK(titan_test::same_bits_or_nan(inverse, inverse_want));
          }
}

TEST_CASE("fused float8_cast: errors name what is wrong") {
  const auto hp = torch::randn({4, 8}, torch::TensorOptions().device(device()));
  const auto amax = hp.abs().max();
  CHECK(error_of([&] { titan::float8_cast(hp, amax, at::kBFloat16, false); })
            .find("expected Float8_e4m3fn or Float8_e5m2") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast(hp.to(at::kFloat8_e4m3fn), amax, at::kFloat8_e4m3fn, false); })
            .find("must be fp64, fp32, fp16 or bf16, got Float8_e4m3fn") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast(hp.to(torch::kLong), amax, at::kFloat8_e4m3fn, false); })
            .find("must be fp64, fp32, fp16 or bf16, got Long") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast(hp, torch::ones({5, 1}, hp.options()), at::kFloat8_e4m3fn, false); })
            .find("amax of shape [5, 1] does not fit a tensor of shape [4, 8]") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast(hp, torch::ones({4, 1, 1}, hp.options()), at::kFloat8_e4m3fn, false); })
            .find("amax of shape [4, 1, 1] does not fit") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast(hp, amax.to(torch::kLong), at::kFloat8_e4m3fn, false); })
            .find("amax must be floating, got Long") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast_transpose(hp.view({2, 2, 8}), amax, at::kFloat8_e4m3fn, false, true, true); })
            .find("must be 2-D (a matmul operand), got shape [2, 2, 8]") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast_transpose(hp, amax, at::kFloat8_e4m3fn, false, false, false); })
            .find("no layout asked for; expected row_major, column_major or both") != std::string::npos);
  CHECK(error_of([&] { titan::float8_cast_transpose(hp, amax, at::kBFloat16, false, true, false); })
            .find("expected Float8_e4m3fn or Float8_e5m2") != std::string::npos);
}
