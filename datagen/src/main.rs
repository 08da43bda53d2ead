//! `datagen`: the teacher side of the toolkit. Its commands (run, rescore, stats, verify,
//! export) are built under issues #4 and #5; until then the binary says so instead of
//! pretending to work.

fn main() -> std::process::ExitCode {
    eprintln!(
        "datagen: no commands yet. Teacher sampling, verification and Parquet output are planned \
         (issues #4 and #5); see README.md for what works today."
    );
    std::process::ExitCode::from(2)
}
