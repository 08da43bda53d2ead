//! Datasets: JSONL / Parquet rows with their provenance, reasoning traces tokenized for SFT,
//! and packing.

pub mod packing;
pub mod records;
pub mod traces;
