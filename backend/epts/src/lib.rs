//! EPTS (placeholder).
