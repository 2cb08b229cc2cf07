#include "odr_headers.hpp"

int odr_other() { return static_cast<int>(titan::chunk_sizes(5, 2)[1]); }
