// The headers in reverse order of odr_headers.hpp, each first in some TU to show it is self-contained.
#include <titan/world.hpp>
#include <titan/sharding.hpp>
#include <titan/meta.hpp>
#include <titan/mesh.hpp>
#include <titan/log.hpp>
#include <titan/hooks.hpp>
#include <titan/dist.hpp>
#include <titan/collectives.hpp>
#include "odr_headers.hpp"

int odr_other() { return static_cast<int>(titan::chunk_sizes(5, 2)[1]); }
