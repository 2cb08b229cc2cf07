// titan/detail/json.hpp and titan/safetensors.hpp. The JSON cases hold no tensors; reading a file
// gives CPU tensors, and the round trip saves device()'s (save takes tensors on any device).
#include "support.hpp"

#include <titan/safetensors.hpp>

using namespace models_test;
namespace st = titan::safetensors;
namespace json = titan::json;

TEST_CASE("json: values, order, exact integers and round trip") {
  auto v = json::parse(R"( {"b": [1, -2, 3.5, 1e3, true, false, null], "a": {"s": "x\"\\\/\n\u00e9\ud83d\ude00"},
                            "big": 9007199254740993, "neg": -0.0} )",
                       "t.json");
  REQUIRE(v.is_object());
  CHECK(v.as_object()[0].first == "b");  // insertion order kept
  const auto& b = v.at("b").as_array();
  CHECK(b[0].as_int() == 1);
  CHECK(b[1].as_int() == -2);
  CHECK(b[2].as_double() == 3.5);
  CHECK(b[3].is_number());
  CHECK(b[3].as_int() == 1000);
  CHECK(b[4].as_bool());
  CHECK(b[6].is_null());
  CHECK(v.at("a").at("s").as_string() == "x\"\\/\n\xC3\xA9\xF0\x9F\x98\x80");
  CHECK(v.at("big").as_int() == 9007199254740993LL);  // beyond double precision, kept exact
  auto again = json::parse(json::dump(v), "dump");
  CHECK(json::dump(again) == json::dump(v));
  CHECK(json::dump(again, 2) == json::dump(v, 2));
  CHECK(json::dump(json::Value(0.1)) == "0.1");
  CHECK(json::dump(json::Value(500000.0)) == "500000.0");
  CHECK(json::parse(json::dump(json::Value(1.0 / 3.0))).as_double() == 1.0 / 3.0);
  CHECK(json::dump(json::Value("\x01")) == "\"\\u0001\"");
  json::Value built;
  built["x"]["y"] = 3;
  built["list"].push_back("s");
  CHECK(json::dump(built) == R"({"x":{"y":3},"list":["s"]})");
}

TEST_CASE("json: strict parsing with located errors") {
  for (const char* bad : {"{\"a\": 1,}", "[1, 2,]", "{\"a\": 1} x", "// c\n{}", "{'a': 1}", "{\"a\": 1, \"a\": 2}",
                          "\"tab\there\"", "[01]", "[1.]", "NaN", "\"\\x\"", "\"\\ud800\"", "{\"a\" 1}", "", "[",
                          "tru"}) {
    CAPTURE(bad);
    auto message = error_of([&] { json::parse(bad, "bad.json"); });
    CHECK_CONTAINS(message, "bad.json: invalid JSON at byte");
  }
  CHECK_CONTAINS(error_of([] { json::parse("{\"a\": 1, \"a\": 2}", "d.json"); }), "duplicate key \"a\"");
  CHECK_CONTAINS(error_of([] { json::parse("{}").at("missing"); }), "missing key \"missing\"");
  CHECK_CONTAINS(error_of([] { json::parse("\"s\"").as_int(); }), "expected an integer, got string");
  std::string deep(600, '[');
  CHECK_CONTAINS(error_of([&] { json::parse(deep, "deep"); }), "nesting deeper");
}

TEST_CASE("safetensors: every dtype round-trips, header is 8-byte aligned") {
  auto dir = scratch_dir("dtypes");
  auto base = torch::arange(-6, 6, torch::kDouble).reshape({3, 4});
  st::NamedTensors tensors;
  for (auto type : {torch::kDouble, torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kLong, torch::kInt,
                    torch::kShort, torch::kChar}) {
    tensors.emplace_back(st::dtype_name(type), base.to(device(), type));
  }
  tensors.emplace_back("U8", (base + 6).to(device(), torch::kByte));
  tensors.emplace_back("BOOL", base.gt(0).to(device()));
  tensors.emplace_back("scalar", torch::tensor(2.5f).reshape({}).to(device()));
  tensors.emplace_back("empty", torch::empty({0, 3}, device()));
  const std::string path = dir + "/all.safetensors";
  st::save(path, tensors, {{"format", "pt"}, {"note", "x"}});

  auto bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  CHECK(n % 8 == 0);
  auto header = json::parse(bytes.substr(8, n), "header");
  CHECK(header.at("__metadata__").at("note").as_string() == "x");
  CHECK(header.at("F32").at("data_offsets").as_array()[1].as_int() -
            header.at("F32").at("data_offsets").as_array()[0].as_int() ==
        48);

  st::File file(path);
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.tensors().size() == tensors.size());
  for (const auto& [name, tensor] : tensors) {
    CAPTURE(name);
    auto back = file.read(name);
    CHECK((back.scalar_type() == tensor.scalar_type()));
    CHECK(back.sizes() == tensor.sizes());
    CHECK(back.is_cpu());
    CHECK(same_values(back, tensor));
  }
  CHECK((file.info("BF16").dtype == torch::kBFloat16));
  CHECK(file.info("F16").shape == std::vector<int64_t>{3, 4});
}

// File format: CPU tensors in and out.
TEST_CASE("safetensors: slices read rectangles") {
  auto dir = scratch_dir("slices");
  auto t = torch::arange(5 * 6 * 7, torch::kFloat).reshape({5, 6, 7});
  st::save(dir + "/t.safetensors", {{"t", t}, {"v", torch::arange(10, torch::kLong)}});
  st::File file(dir + "/t.safetensors");
  CHECK(torch::equal(file.read_slice("t", {1, 2, 3}, {3, 4, 2}), t.slice(0, 1, 4).slice(1, 2, 6).slice(2, 3, 5)));
  CHECK(torch::equal(file.read_slice("t", {4, 0, 0}, {1, 6, 7}), t.slice(0, 4, 5)));
  CHECK(torch::equal(file.read_slice("v", {7}, {3}), torch::arange(7, 10, torch::kLong)));
  CHECK(file.read_slice("t", {5, 0, 0}, {0, 6, 7}).numel() == 0);
  CHECK_CONTAINS(error_of([&] { file.read_slice("t", {3, 0, 0}, {3, 6, 7}); }), "outside shape");
  CHECK_CONTAINS(error_of([&] { file.read_slice("t", {0, 0}, {1, 1}); }), "needs 3 offsets");
  CHECK_CONTAINS(error_of([&] { file.read("nope"); }), "t.safetensors has no tensor 'nope'");
}

// File format: CPU tensors in and out.
TEST_CASE("safetensors: bad files give errors naming the file and tensor") {
  auto dir = scratch_dir("bad");
  const std::string good = dir + "/good.safetensors";
  st::save(good, {{"weight", torch::ones({4, 4})}, {"bias", torch::ones({4})}});
  auto bytes = read_bytes(good);

  const std::string truncated = dir + "/truncated.safetensors";
  write_bytes(truncated, bytes.substr(0, bytes.size() - 10));
  auto message = error_of([&] { st::File f(truncated); });
  CHECK_CONTAINS(message, "truncated.safetensors");
  CHECK_CONTAINS(message, "out of range");
  CHECK_CONTAINS(message, "'bias'");

  const std::string tiny = dir + "/tiny.safetensors";
  write_bytes(tiny, bytes.substr(0, 5));
  CHECK_CONTAINS(error_of([&] { st::File f(tiny); }), "tiny.safetensors is truncated: 5 bytes");

  const std::string long_header = dir + "/long_header.safetensors";
  write_bytes(long_header, bytes.substr(0, 40));
  message = error_of([&] { st::File f(long_header); });
  CHECK_CONTAINS(message, "long_header.safetensors: header length");
  CHECK_CONTAINS(message, "beyond the file size 40");

  const std::string unknown = dir + "/unknown.safetensors";
  write_bytes(unknown, raw_safetensors(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}})", "ab"));
  message = error_of([&] { st::File f(unknown); });
  CHECK_CONTAINS(message, "unknown.safetensors, tensor 'w': unknown dtype \"Q4\"");

  const std::string mismatch = dir + "/mismatch.safetensors";
  write_bytes(mismatch, raw_safetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
  CHECK_CONTAINS(error_of([&] { st::File f(mismatch); }), "tensor 'w': data_offsets span 8 bytes");

  const std::string overlap = dir + "/overlap.safetensors";
  write_bytes(overlap, raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                       R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                                       "123456"));
  CHECK_CONTAINS(error_of([&] { st::File f(overlap); }), "overlap");

  const std::string garbage = dir + "/garbage.safetensors";
  write_bytes(garbage, raw_safetensors("{\"w\": [1,}", ""));
  CHECK_CONTAINS(error_of([&] { st::File f(garbage); }), "garbage.safetensors header: invalid JSON");

  CHECK_CONTAINS(error_of([&] { st::File f(dir + "/missing.safetensors"); }), "cannot open");
  CHECK_CONTAINS(error_of([&] { st::save(dir + "/c.safetensors", {{"z", torch::zeros({2}, torch::kComplexFloat)}}); }),
                 "cannot be stored");
  CHECK_CONTAINS(error_of([&] { st::save(dir + "/d.safetensors", {{"a", torch::zeros({1})}, {"a", torch::zeros({1})}}); }),
                 "duplicate tensor name 'a'");
}

// File format: CPU tensors in and out.
TEST_CASE("safetensors: sharded checkpoints with an index") {
  auto dir = scratch_dir("sharded");
  st::NamedTensors tensors;
  for (int i = 0; i < 5; ++i) tensors.emplace_back("t" + std::to_string(i), torch::full({8, 8}, float(i)));  // 256 B each
  auto files = st::save_sharded(dir, tensors, st::SaveOptions().max_shard_bytes(600).metadata({{"format", "pt"}}));
  REQUIRE(files.size() == 3);  // 2 + 2 + 1 tensors
  CHECK(files[0] == "model-00001-of-00003.safetensors");
  auto index = json::parse(read_bytes(dir + "/" + st::kIndexName), "index");
  CHECK(index.at("metadata").at("total_size").as_int() == 5 * 256);
  CHECK(index.at("weight_map").at("t4").as_string() == "model-00003-of-00003.safetensors");
  st::Reader reader(dir);
  CHECK(reader.files().size() == 3);
  CHECK(reader.names() == std::vector<std::string>{"t0", "t1", "t2", "t3", "t4"});
  for (const auto& [name, tensor] : tensors) CHECK(torch::equal(reader.read(name), tensor));
  CHECK(torch::equal(reader.read_slice("t3", {2, 0}, {1, 8}), torch::full({1, 8}, 3.0f)));
  CHECK_CONTAINS(error_of([&] { reader.read("t9"); }), "has no tensor 't9'");

  // One shard: model.safetensors, and the stale index is removed.
  st::save_sharded(dir, tensors);
  st::Reader single(dir);
  CHECK(single.files().size() == 1);
  CHECK(single.names().size() == 5);

  // An index naming a missing file or a tensor its file lacks.
  auto bad = scratch_dir("bad_index");
  st::save(bad + "/a.safetensors", {{"x", torch::zeros({1})}});
  write_bytes(bad + "/" + st::kIndexName, R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  CHECK_CONTAINS(error_of([&] { st::Reader r(bad); }), "tensor 'y' is mapped to b.safetensors, which does not exist");
  write_bytes(bad + "/" + st::kIndexName, R"({"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}})");
  CHECK_CONTAINS(error_of([&] { st::Reader r(bad); }), "does not hold it");
  CHECK_CONTAINS(error_of([&] { st::Reader r(scratch_dir("empty")); }), "has neither");
}
