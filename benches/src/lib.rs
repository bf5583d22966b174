//! Cross-crate benchmarks; the per-codec criterion benches live beside their crates.
