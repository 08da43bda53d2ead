//! The reference side of a benchmark (`distill bench`, `datagen bench`): the same measurement
//! made by another implementation (PyTorch, Python's openai client) in the same run, so the
//! printed ratio compares like with like on the same machine.

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("running reference command `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("reference command failed: {0}")]
    Failed(String),
    #[error("reference printed no JSON line")]
    NoJson,
    #[error("reference JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs `command` through `sh -c` and parses the last line of its output that is a JSON object.
pub fn run_reference(command: &str) -> Result<serde_json::Value, ReferenceError> {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .map_err(|source| ReferenceError::Spawn { command: command.to_string(), source })?;
    if !output.status.success() {
        return Err(ReferenceError::Failed(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or(ReferenceError::NoJson)?;
    Ok(serde_json::from_str(line)?)
}
