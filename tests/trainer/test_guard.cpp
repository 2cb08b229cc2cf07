// Tests of examples/common/guard.cpp: the NaN/Inf policy and the SIGINT/SIGTERM stop flag.
#include "trainer_fixtures.hpp"

#include <common/guard.hpp>

#include <csignal>


TEST_CASE("guard: non-finite steps stop the run naming them, or are skipped") {
  NanGuard stop(nan_policy_from_string("stop"));
  stop.check(1, 10, 0);
  CHECK_ERROR_HAS(stop.check(11, 20, 2), "2 step(s) of steps 11-20", "nan_policy");
  NanGuard skip(nan_policy_from_string("skip"));
  skip.check(11, 20, 2);
  CHECK_ERROR_HAS(nan_policy_from_string("ignore"), "'ignore'", "stop, skip");
}

TEST_CASE("guard: SIGINT/SIGTERM set the flag instead of ending the process") {
  {
    SignalFlag flag;
    CHECK_FALSE(flag.requested());
    CHECK_ERROR_HAS(SignalFlag(), "another SignalFlag");
    std::raise(SIGTERM);
    CHECK(flag.requested());
    CHECK(flag.signal_number() == SIGTERM);
    CHECK(flag.any_rank(nullptr));
  }
  SignalFlag again;
  CHECK_FALSE(again.requested());
  std::raise(SIGINT);
  CHECK(again.signal_number() == SIGINT);
}

TEST_SUITE("multirank") {
  TEST_CASE("multirank: a signal on one rank stops every rank") {
    const auto& group = titan_test::world()->group();
    SignalFlag flag;
    CHECK_FALSE(flag.any_rank(group));
    if (group->rank() == group->size() - 1) std::raise(SIGINT);
    CHECK(flag.any_rank(group));
    CHECK(flag.requested() == (group->rank() == group->size() - 1));
  }
}
