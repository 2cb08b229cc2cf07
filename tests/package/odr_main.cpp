// Two translation units (this and odr_other.cpp) include every titan header and link together:
// a non-inline definition in a header would fail to link.
#include "odr_headers.hpp"

int odr_other();

int main() { return odr_other() == titan::chunk_sizes(5, 2)[1] ? 0 : 1; }
