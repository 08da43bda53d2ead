//! Whole run folders: their current generation, joining several into one (`datagen merge`), and
//! dropping failed samples so that a run asks for them again (`datagen run --retry-failed`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::Digest;

use crate::run::{now, read_manifest, write_manifest};
use crate::schema::Row;
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} is not a datagen run folder (no readable manifest.json)")]
    NotARun(PathBuf),
    #[error("{0} exists; merge writes a new folder")]
    Exists(PathBuf),
    #[error("key {key} is stored differently in {first} and {second}")]
    Conflict { key: String, first: PathBuf, second: PathBuf },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FolderError + '_ {
    move |e| FolderError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// The generation the manifest of run folder `dir` names.
pub fn generation(dir: &Path) -> Result<u32, FolderError> {
    let manifest = read_manifest(dir).map_err(|_| FolderError::NotARun(dir.to_path_buf()))?;
    Ok(manifest["generation"].as_u64().unwrap_or(0) as u32)
}

/// Joins run folders into the new folder `out`: every stored sample once (a key in two folders is
/// taken from the first that has it; two different rows under one key are an error), the
/// manifests' run histories kept. Streamed; written beside `out` and renamed into place when
/// complete. Returns the samples written.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<usize, FolderError> {
    if out.exists() {
        return Err(FolderError::Exists(out.to_path_buf()));
    }
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("merged");
    let staging = out.with_file_name(format!(".{name}.merging"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    let written = merge_into(dirs, &staging);
    match written {
        Ok(count) => {
            std::fs::rename(&staging, out).map_err(io(out))?;
            Ok(count)
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(error)
        }
    }
}

fn merge_into(dirs: &[PathBuf], staging: &Path) -> Result<usize, FolderError> {
    std::fs::create_dir_all(staging.join("data")).map_err(io(staging))?;
    // Per key: the folder it came from and a digest of what was stored, so that memory holds
    // keys, never traces.
    let mut seen: HashMap<String, (usize, [u8; 32])> = HashMap::new();
    let mut writer = store::GenerationWriter::new(&staging.join("data"), 0, 256)?;
    let mut runs = Vec::new();
    let mut first_manifest = None;
    for (index, dir) in dirs.iter().enumerate() {
        let _lock = store::lock(dir)?; // nobody writes a folder while it is merged
        let manifest = read_manifest(dir).map_err(|_| FolderError::NotARun(dir.clone()))?;
        let generation = manifest["generation"].as_u64().unwrap_or(0) as u32;
        let mut conflict = None;
        store::for_each_row(&dir.join("data"), generation, |row| {
            // What was stored: the status, the error and the conversation (old shards' separate
            // reasoning/content columns are read back from it too, so they are not compared).
            let stored = (&row.status, &row.error, row.messages.as_ref().and_then(|m| m.last()).map(|m| &m.content));
            let digest: [u8; 32] = sha2::Sha256::digest(serde_json::to_vec(&stored).unwrap_or_default()).into();
            match seen.get(&row.key) {
                Some((_, same)) if *same == digest => Ok(()),
                Some((other, _)) => {
                    conflict.get_or_insert((row.key.clone(), *other));
                    Ok(())
                }
                None => {
                    seen.insert(row.key.clone(), (index, digest));
                    writer.push(row)
                }
            }
        })?;
        if let Some((key, other)) = conflict {
            return Err(FolderError::Conflict { key, first: dirs[other].clone(), second: dir.clone() });
        }
        runs.extend(manifest["runs"].as_array().cloned().unwrap_or_default());
        first_manifest.get_or_insert(manifest);
    }
    let count = writer.finish()?;
    let mut manifest = first_manifest.unwrap_or_else(|| json!({}));
    manifest["generation"] = json!(0);
    manifest["runs"] = json!(runs);
    manifest["merged_from"] = json!(dirs);
    manifest["merged_at"] = json!(now());
    manifest["prompts"]["shard"] = serde_json::Value::Null;
    write_manifest(staging, &manifest)?;
    Ok(count)
}

/// Removes the failed rows of `classes` (every class when empty) among the keys a run asks for
/// (`wanted`) from the run folder `out`, as a new generation written beside the current one and
/// switched to atomically, so that the run asks for those samples again under the same keys.
/// Returns the generation to write to and the samples dropped.
pub fn drop_failed(
    out: &Path,
    generation: u32,
    classes: &[String],
    wanted: &HashSet<String>,
    shard_rows: usize,
    mut manifest: serde_json::Value,
) -> Result<(u32, usize), FolderError> {
    let data = out.join("data");
    let retried = |row: &Row| {
        row.status == "failed"
            && wanted.contains(&row.key)
            && (classes.is_empty() || row.error_class.as_ref().is_some_and(|c| classes.contains(c)))
    };
    let mut count = 0;
    store::for_each_row(&data, generation, |row| {
        count += usize::from(retried(&row));
        Ok(())
    })?;
    if count == 0 {
        return Ok((generation, 0));
    }
    let mut next = generation;
    store::rewrite_with(
        &data,
        generation,
        shard_rows,
        |writer| store::for_each_row(&data, generation, |row| if retried(&row) { Ok(()) } else { writer.push(row) }),
        |g| {
            next = g;
            manifest["generation"] = json!(g);
            manifest["retried_failed_at"] = json!(now());
            write_manifest(out, &manifest)
        },
    )?;
    Ok((next, count))
}
