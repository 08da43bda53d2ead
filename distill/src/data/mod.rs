//! Datasets: JSONL / Parquet rows with their provenance.

pub mod records;
