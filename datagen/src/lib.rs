//! The teacher side of the toolkit: sample reasoning traces from a teacher served behind an
//! OpenAI-compatible API ([`teacher`]), verify ([`verify`]) and filter ([`filters`]) them, and
//! store them exactly once as Parquet ([`store`], [`schema`]); [`run`] drives it all.

pub mod export;
pub mod filters;
pub mod folder;
pub mod prompts;
pub mod reasoning;
pub mod run;
pub mod schema;
pub mod scoring;
pub mod store;
pub mod teacher;
pub mod verify;
