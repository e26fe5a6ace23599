// Version and build facts of libmixprec, and the symbol that keeps the library linked.
#pragma once

namespace mixprec {

/// The library version, e.g. "0.1.0".
const char* version();

/// True when this libmixprec was built with its CUDA kernels.
bool built_with_cuda();

}  // namespace mixprec

// mixprec's ops register themselves with the dispatcher from static initialisers inside libmixprec.
// A program that only reaches them through the dispatcher would reference no libmixprec symbol, and
// a linker with --as-needed would then drop the library and its registrations. Every translation unit
// that includes a mixprec header therefore holds one reference (the same trick torchvision uses).
namespace mixprec::detail {
[[gnu::used]] static const char* (*const keep_libmixprec_linked)() = &::mixprec::version;
}  // namespace mixprec::detail
