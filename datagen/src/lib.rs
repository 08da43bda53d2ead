//! The datagen library (teacher client, verifier, Parquet store) is planned under issues #4 and #5.
