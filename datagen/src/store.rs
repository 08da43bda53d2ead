//! Exactly-once storage of samples.
//!
//! A finished sample is appended to `journal.wal` (one JSON line, fsynced) before anything
//! else happens, so a kill loses only requests still in flight. Every `shard_rows` rows the
//! journal is compacted into a Parquet shard, written as a hidden temporary file, fsynced and
//! renamed into place (a reader never sees half a shard), then the journal is emptied the same
//! way. A kill between the two leaves rows both in a shard and in the journal: on opening, the
//! journal's rows whose keys a shard already holds are dropped, so every key is stored once.
//! A torn last journal line (a kill mid-write) is discarded: its request was still in flight.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::schema::{self, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{dir} is being written by another datagen process{holder}; wait for it to finish, or give this one another folder")]
    Locked { dir: PathBuf, holder: String },
}

/// Test-only crash injection: with `DATAGEN_FAILPOINT=NAME` in the environment the process
/// aborts at the step of the storage protocol called NAME, as a kill at that instant would stop
/// it (the crash-window tests set it; nothing else does).
pub fn failpoint(name: &str) {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if CHOSEN.get_or_init(|| std::env::var("DATAGEN_FAILPOINT").ok()).as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Every failpoint of the storage protocol, in the order a run and a rescore reach them.
pub const FAILPOINTS: &[&str] = &[
    "journal-torn-line",
    "journal-appended",
    "shard-temporary-written",
    "shard-renamed",
    "journal-reset",
    "rescore-shards-written",
    "rescore-committed",
];

/// The lock file of a run folder.
const LOCK: &str = ".datagen.lock";

/// Holds the one-writer lock of a run folder (`datagen run`, `rescore`) until dropped. The
/// operating system releases it when the process ends, however it ends, so a kill never leaves a
/// stale lock behind.
pub struct FolderLock {
    _file: File,
}

/// Takes the one-writer lock of `dir`, or says who holds it.
pub fn lock(dir: &Path) -> Result<FolderLock, StoreError> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(|e| file_error(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            // The holder's pid, for the message a second process prints.
            file.set_len(0).and_then(|_| file.write_all(std::process::id().to_string().as_bytes())).map_err(|e| file_error(&path, e))?;
            Ok(FolderLock { _file: file })
        }
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).ok().filter(|pid| !pid.trim().is_empty()).map(|pid| format!(" (pid {})", pid.trim())).unwrap_or_default();
            Err(StoreError::Locked { dir: dir.to_path_buf(), holder })
        }
        Err(fs::TryLockError::Error(e)) => Err(file_error(&path, e)),
    }
}

pub(crate) fn file_error(path: &Path, message: impl ToString) -> StoreError {
    StoreError::File { path: path.to_path_buf(), message: message.to_string() }
}

const JOURNAL: &str = "journal.wal";

/// Shards of `generation` in `dir`, in order.
pub fn shards(dir: &Path, generation: u32) -> Result<Vec<PathBuf>, StoreError> {
    let prefix = format!("samples-g{generation}-");
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| file_error(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".parquet"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

pub fn read_shard(path: &Path) -> Result<Vec<Row>, StoreError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| file_error(path, e))?.build().map_err(|e| file_error(path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| file_error(path, e))?;
        rows.extend(schema::from_batch(&batch).map_err(|e| file_error(path, e))?);
    }
    Ok(rows)
}

/// The `key` column of a shard alone: what resuming needs, without reading the traces.
fn read_keys(path: &Path) -> Result<Vec<String>, StoreError> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| file_error(path, e))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["key"]);
    let mut keys = Vec::new();
    for batch in builder.with_projection(mask).build().map_err(|e| file_error(path, e))? {
        let batch = batch.map_err(|e| file_error(path, e))?;
        let column = batch
            .column_by_name("key")
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
            .ok_or_else(|| file_error(path, "no `key` column of strings"))?;
        keys.extend(column.iter().flatten().map(String::from));
    }
    Ok(keys)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| file_error(dir, e))
}

/// Writes `path` under a hidden temporary name beside it, fsyncs it, then renames it into
/// place and fsyncs the folder: a reader (or a resume after a kill) never sees half a file.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut File) -> Result<(), String>) -> Result<(), StoreError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = File::create(&temporary).map_err(|e| file_error(&temporary, e))?;
    write(&mut file).map_err(|e| file_error(&temporary, e))?;
    file.sync_all().map_err(|e| file_error(&temporary, e))?;
    fs::rename(&temporary, path).map_err(|e| file_error(path, e))?;
    sync_dir(dir)
}

/// Every row of a journal, each key once, skipping `seen` keys and adding the rest to it. A
/// line that does not parse is the torn tail of a killed write: its request was in flight.
fn read_journal(path: &Path, seen: &mut HashSet<String>) -> Vec<Row> {
    let Ok(text) = fs::read(path) else { return Vec::new() };
    text.split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Row>(line).ok())
        .filter(|row| seen.insert(row.key.clone()))
        .map(|mut row| {
            row.derive_trace();
            row
        })
        .collect()
}

/// Writes `rows` as the Parquet file `path`, atomically.
pub fn write_shard(path: &Path, rows: &[Row]) -> Result<(), StoreError> {
    write_parquet(path, schema::schema(), rows)
}

/// Writes serde rows of `schema` as the Parquet file `path` (zstd, one row group), atomically.
pub fn write_parquet<S: serde::Serialize>(path: &Path, schema: std::sync::Arc<arrow::datatypes::Schema>, rows: &[S]) -> Result<(), StoreError> {
    let mut file = ParquetStream::create(path, schema, rows.len())?;
    for row in rows {
        file.push(row)?;
    }
    file.finish().map(|_| ())
}

/// A Parquet file written row group by row group (zstd) under a hidden temporary name and renamed
/// into place when finished: memory holds one group of rows, and a reader never sees half a file.
pub struct ParquetStream<S: serde::Serialize> {
    path: PathBuf,
    temporary: PathBuf,
    schema: std::sync::Arc<arrow::datatypes::Schema>,
    writer: Option<parquet::arrow::ArrowWriter<File>>,
    pending: Vec<S>,
    group_rows: usize,
    pub rows: usize,
}

impl<S: serde::Serialize> ParquetStream<S> {
    pub fn create(path: &Path, schema: std::sync::Arc<arrow::datatypes::Schema>, group_rows: usize) -> Result<Self, StoreError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let temporary = dir.join(format!(".{name}.tmp"));
        let file = File::create(&temporary).map_err(|e| file_error(&temporary, e))?;
        let properties = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_max_row_group_row_count(Some(group_rows.max(1)))
            .build();
        let writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(|e| file_error(&temporary, e))?;
        Ok(ParquetStream { path: path.to_path_buf(), temporary, schema, writer: Some(writer), pending: Vec::new(), group_rows: group_rows.max(1), rows: 0 })
    }

    pub fn push(&mut self, row: S) -> Result<(), StoreError> {
        self.pending.push(row);
        self.rows += 1;
        if self.pending.len() >= self.group_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let error = |e: &dyn std::fmt::Display| file_error(&self.temporary, e);
        let mut decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
            .with_batch_size(self.pending.len())
            .build_decoder()
            .map_err(|e| error(&e))?;
        decoder.serialize(&self.pending).map_err(|e| error(&e))?;
        if let Some(batch) = decoder.flush().map_err(|e| error(&e))? {
            let writer = self.writer.as_mut().expect("open until finished");
            writer.write(&batch).map_err(|e| error(&e))?;
            writer.flush().map_err(|e| error(&e))?;
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes the last group, closes the file and renames it into place.
    pub fn finish(mut self) -> Result<usize, StoreError> {
        self.flush()?;
        let writer = self.writer.take().expect("open until finished");
        let file = writer.into_inner().map_err(|e| file_error(&self.temporary, e))?;
        file.sync_all().map_err(|e| file_error(&self.temporary, e))?;
        failpoint("shard-temporary-written");
        fs::rename(&self.temporary, &self.path).map_err(|e| file_error(&self.path, e))?;
        sync_dir(self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        Ok(self.rows)
    }
}

impl<S: serde::Serialize> Drop for ParquetStream<S> {
    fn drop(&mut self) {
        // Not finished (an error on the way): no half-written file stays behind.
        if self.writer.is_some() {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

pub struct Store {
    dir: PathBuf,
    generation: u32,
    next_shard: u32,
    journal: File,
    /// Keys stored (in shards or in the journal).
    done: HashSet<String>,
    /// Rows in the journal, not yet in a shard.
    pending: Vec<Row>,
    pub shard_rows: usize,
}

impl Store {
    /// Opens (or starts) the store in `dir`: reads the keys of every shard of `generation`,
    /// folds what the journal holds beyond them into a new shard, and starts an empty journal.
    pub fn open(dir: &Path, generation: u32, shard_rows: usize) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        // Temporary files of a killed write: their rows are still in the journal.
        for entry in fs::read_dir(dir).map_err(|e| file_error(dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(entry.path()).map_err(|e| file_error(&entry.path(), e))?;
            }
        }
        // The writer holds the folder's lock: shards of another generation are a killed rescore's.
        remove_other_generations(dir, generation)?;
        let mut done = HashSet::new();
        let existing = shards(dir, generation)?;
        for path in &existing {
            done.extend(read_keys(path)?);
        }
        let next_shard = existing
            .iter()
            .filter_map(|p| p.file_stem()?.to_str()?.rsplit('-').next()?.parse::<u32>().ok())
            .max()
            .map_or(0, |n| n + 1);
        let journal_path = dir.join(JOURNAL);
        let pending = read_journal(&journal_path, &mut done);
        let journal = OpenOptions::new().create(true).append(true).open(&journal_path).map_err(|e| file_error(&journal_path, e))?;
        let mut store = Store { dir: dir.to_path_buf(), generation, next_shard, journal, done, pending, shard_rows: shard_rows.max(1) };
        store.compact()?;
        Ok(store)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Stores one finished sample durably; a key already stored is ignored.
    pub fn append(&mut self, row: Row) -> Result<(), StoreError> {
        if !self.done.insert(row.key.clone()) {
            return Ok(());
        }
        let path = self.dir.join(JOURNAL);
        let mut line = serde_json::to_vec(&row).map_err(|e| file_error(&path, e))?;
        line.push(b'\n');
        if std::env::var_os("DATAGEN_FAILPOINT").is_some_and(|f| f == "journal-torn-line") {
            // Half a line reaches the disk, as a kill during the write would leave it.
            let _ = self.journal.write_all(&line[..line.len() / 2]).and_then(|_| self.journal.sync_data());
            failpoint("journal-torn-line");
        }
        self.journal.write_all(&line).and_then(|_| self.journal.sync_data()).map_err(|e| file_error(&path, e))?;
        failpoint("journal-appended");
        self.pending.push(row);
        if self.pending.len() >= self.shard_rows {
            self.compact()?;
        }
        Ok(())
    }

    /// Moves the journal's rows into a new shard and empties the journal.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let journal_path = self.dir.join(JOURNAL);
        if !self.pending.is_empty() {
            let path = self.dir.join(format!("samples-g{}-{:06}.parquet", self.generation, self.next_shard));
            write_shard(&path, &self.pending)?;
            failpoint("shard-renamed");
            self.next_shard += 1;
            self.pending.clear();
        }
        write_atomically(&journal_path, |_| Ok(()))?;
        if self.next_shard > 0 {
            failpoint("journal-reset");
        }
        self.journal = OpenOptions::new().append(true).open(&journal_path).map_err(|e| file_error(&journal_path, e))?;
        Ok(())
    }
}

/// The settings hashes of every stored key of `generation` (the part after the key's last `/`):
/// which sampling settings the folder holds samples of. Reads the key column only.
pub fn settings_hashes(dir: &Path, generation: u32) -> Result<std::collections::BTreeSet<String>, StoreError> {
    let mut keys = HashSet::new();
    for path in shards(dir, generation)? {
        keys.extend(read_keys(&path)?);
    }
    let _ = read_journal(&dir.join(JOURNAL), &mut keys);
    Ok(keys.iter().filter_map(|k| k.rsplit('/').next().map(String::from)).collect())
}

/// Removes the shards of every generation but `keep`: those a rescore killed before or after
/// its switch left behind, which a reader of the folder's files (distill) would otherwise read too.
pub fn remove_other_generations(dir: &Path, keep: u32) -> Result<(), StoreError> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let generation = name.strip_prefix("samples-g").and_then(|rest| rest.split('-').next()).and_then(|g| g.parse::<u32>().ok());
        if generation.is_some_and(|g| g != keep) && name.ends_with(".parquet") {
            fs::remove_file(entry.path()).map_err(|e| file_error(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Rows per record batch when a generation is streamed: 16 traces of 32k tokens (and their
/// conversations) are about 8 MB, a few times that while decoded.
pub const STREAM_BATCH_ROWS: usize = 16;

/// Text a writer holds before it writes a shard or a row group, whatever its row count.
const MAX_PENDING_BYTES: usize = 32 << 20;

/// The text a row holds, roughly: what its encoding costs in memory.
pub fn row_bytes(row: &Row) -> usize {
    row.problem.len()
        + row.reasoning.as_ref().map_or(0, String::len)
        + row.content.as_ref().map_or(0, String::len)
        + row.messages.as_ref().map_or(0, |m| m.iter().map(|m| m.content.len()).sum())
}

/// Calls `each` with every stored row of `generation` (shards, then journal rows not in them),
/// each key once, reading record batch by record batch: memory holds one batch of rows and the
/// set of keys seen, never the whole run.
pub fn for_each_row(dir: &Path, generation: u32, mut each: impl FnMut(Row) -> Result<(), StoreError>) -> Result<(), StoreError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut seen = HashSet::new();
    for path in shards(dir, generation)? {
        let file = File::open(&path).map_err(|e| file_error(&path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| file_error(&path, e))?
            .with_batch_size(STREAM_BATCH_ROWS)
            .build()
            .map_err(|e| file_error(&path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| file_error(&path, e))?;
            for row in schema::from_batch(&batch).map_err(|e| file_error(&path, e))? {
                if seen.insert(row.key.clone()) {
                    each(row)?;
                }
            }
        }
    }
    for row in read_journal(&dir.join(JOURNAL), &mut seen) {
        each(row)?;
    }
    Ok(())
}

/// Writes rows as the shards of a new generation as they come, `shard_rows` at a time, so that
/// a rewrite of any size holds one shard's rows at most.
pub struct GenerationWriter {
    dir: PathBuf,
    generation: u32,
    shard_rows: usize,
    next_shard: usize,
    pending: Vec<Row>,
    pending_bytes: usize,
    pub rows: usize,
}

impl GenerationWriter {
    /// Starts generation `generation` in `dir`, removing shards left by an interrupted attempt.
    pub fn new(dir: &Path, generation: u32, shard_rows: usize) -> Result<GenerationWriter, StoreError> {
        for stale in shards(dir, generation)? {
            fs::remove_file(&stale).map_err(|e| file_error(&stale, e))?;
        }
        Ok(GenerationWriter { dir: dir.to_path_buf(), generation, shard_rows: shard_rows.max(1), next_shard: 0, pending: Vec::new(), pending_bytes: 0, rows: 0 })
    }

    pub fn push(&mut self, row: Row) -> Result<(), StoreError> {
        self.pending_bytes += row_bytes(&row);
        self.pending.push(row);
        self.rows += 1;
        // Shards of `shard_rows` rows, or fewer when the rows are long.
        if self.pending.len() >= self.shard_rows || self.pending_bytes >= MAX_PENDING_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            write_shard(&self.dir.join(format!("samples-g{}-{:06}.parquet", self.generation, self.next_shard)), &self.pending)?;
            self.next_shard += 1;
            self.pending.clear();
            self.pending_bytes = 0;
        }
        Ok(())
    }

    /// Writes what is left; the generation is complete on disk (not yet switched to).
    pub fn finish(mut self) -> Result<usize, StoreError> {
        self.flush()?;
        Ok(self.rows)
    }
}

/// Every stored row of `generation` (shards, then journal rows not in them), each key once.
pub fn read_all(dir: &Path, generation: u32) -> Result<Vec<Row>, StoreError> {
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    for path in shards(dir, generation)? {
        rows.extend(read_shard(&path)?.into_iter().filter(|r| seen.insert(r.key.clone())));
    }
    rows.extend(read_journal(&dir.join(JOURNAL), &mut seen));
    Ok(rows)
}

/// Replaces generation `from` by `rows` written as generation `from + 1`; see [`rewrite_with`].
pub fn rewrite(
    dir: &Path,
    from: u32,
    rows: &[Row],
    shard_rows: usize,
    commit: impl FnOnce(u32) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    rewrite_with(dir, from, shard_rows, |writer| rows.iter().try_for_each(|row| writer.push(row.clone())), commit)
}

/// Replaces generation `from` by what `fill` pushes into generation `from + 1` (`datagen
/// rescore`, `--retry-failed`): the new shards are complete before `commit` (which records the
/// new generation, e.g. in the manifest) runs, and the old shards are removed only after it.
pub fn rewrite_with(
    dir: &Path,
    from: u32,
    shard_rows: usize,
    fill: impl FnOnce(&mut GenerationWriter) -> Result<(), StoreError>,
    commit: impl FnOnce(u32) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let generation = from + 1;
    let mut writer = GenerationWriter::new(dir, generation, shard_rows)?;
    fill(&mut writer)?;
    writer.finish()?;
    failpoint("rescore-shards-written");
    commit(generation)?;
    failpoint("rescore-committed");
    // Every older generation goes, including one left by a rescore killed after its commit.
    remove_other_generations(dir, generation)?;
    let journal = dir.join(JOURNAL);
    if journal.exists() {
        fs::write(&journal, b"").map_err(|e| file_error(&journal, e))?;
    }
    sync_dir(dir)
}
