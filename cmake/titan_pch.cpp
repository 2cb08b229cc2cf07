// Compiled once to build the precompiled header that titan_add_executable targets reuse.
