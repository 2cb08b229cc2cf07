#pragma once
// titan/titan.hpp: everything titan offers, in one include.

#include <titan/dist.hpp>
#include <titan/hooks.hpp>
#include <titan/meta.hpp>
#include <titan/sharding.hpp>
