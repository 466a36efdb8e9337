//! Benchmark helpers (bootstrap stub).
