//! kache's benchmarks live in `benches/` (criterion micro-benchmarks) and
//! `e2e/` (the comparison with the API server); this library is empty.
