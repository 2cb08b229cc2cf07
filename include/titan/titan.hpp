#pragma once
// titan/titan.hpp: everything titan offers, in one include.

#include <titan/ac.hpp>
#include <titan/checkpoint.hpp>
#include <titan/context_parallel.hpp>
#include <titan/dist.hpp>
#include <titan/expert_parallel.hpp>
#include <titan/float8.hpp>
#include <titan/fsdp.hpp>
#include <titan/fused.hpp>
#include <titan/hooks.hpp>
#include <titan/meta.hpp>
#include <titan/moe.hpp>
#include <titan/pipeline.hpp>
#include <titan/safetensors.hpp>
#include <titan/sharding.hpp>
#include <titan/tasks.hpp>
#include <titan/tensor_parallel.hpp>
