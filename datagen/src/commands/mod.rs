//! The `datagen` commands: argument structs (clap) and thin calls into the library.

mod bench;
mod folder;
mod run;

pub use bench::{BenchClientArgs, bench_client, serve_loopback};
pub use folder::{ExportArgs, MergeArgs, RescoreArgs, StatsArgs, export_command, merge_command, rescore_command, stats_command};
pub use run::{EvalArgs, RunArgs, eval_command, run_command};

use std::path::Path;

use anyhow::Result;
use clap::Args;

use datagen::filters::{self, Filter, FilterConfig};
use datagen::scoring::{Keep, ScoreOptions};

#[derive(Args)]
pub struct FilterOptions {
    /// R1's chain-of-thought filters to apply, comma-separated: language-mixing,
    /// long-paragraph, code-block, repetition, incomplete, length; `all` or `none`.
    #[arg(long, default_value = "all")]
    filters: String,
    /// A paragraph longer than this many characters fails `long-paragraph`.
    #[arg(long, default_value_t = 4000)]
    max_paragraph_chars: usize,
    /// Completion-token bounds of the `length` filter.
    #[arg(long, default_value_t = 1)]
    min_completion_tokens: u64,
    #[arg(long)]
    max_completion_tokens: Option<u64>,
    /// Which samples are accepted: `correct` (verified and filtered: R1's rejection sampling),
    /// `all` (filtered only), or verdict classes, e.g. `correct,unparsable`.
    #[arg(long, default_value = "correct")]
    keep: Keep,
}

impl FilterOptions {
    fn score_options(&self) -> Result<ScoreOptions> {
        let enabled = match self.filters.trim() {
            "all" => filters::ALL.to_vec(),
            "none" => Vec::new(),
            list => list.split(',').map(|name| name.trim().parse::<Filter>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?,
        };
        Ok(ScoreOptions {
            keep: self.keep.clone(),
            filters: FilterConfig {
                enabled,
                max_paragraph_chars: self.max_paragraph_chars,
                min_tokens: self.min_completion_tokens,
                max_tokens: self.max_completion_tokens.unwrap_or(u64::MAX),
                ..FilterConfig::default()
            },
        })
    }
}

fn generation(out: &Path) -> Result<u32> {
    Ok(datagen::folder::generation(out)?)
}

