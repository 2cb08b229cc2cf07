#pragma once
// Every public titan header (keep in sync with include/titan/).
#include <titan/titan.hpp>
#include <titan/ac.hpp>
#include <titan/checkpoint.hpp>
#include <titan/collectives.hpp>
#include <titan/context_parallel.hpp>
#include <titan/dist.hpp>
#include <titan/fsdp.hpp>
#include <titan/hooks.hpp>
#include <titan/log.hpp>
#include <titan/mesh.hpp>
#include <titan/meta.hpp>
#include <titan/pipeline.hpp>
#include <titan/safetensors.hpp>
#include <titan/sharding.hpp>
#include <titan/tensor_parallel.hpp>
#include <titan/world.hpp>
