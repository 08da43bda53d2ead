//! `datagen export --format open-r1`: a run's samples as one row per problem in the layout of
//! open-r1's OpenR1-Math-220k, written in bounded memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::schema::{OpenR1Row, ProblemInfo, Row, open_r1_row, open_r1_schema};
use crate::store::{self, StoreError};

/// What an export wrote: the files (problems in each, path), the problems, and those with an
/// accepted generation in `messages`.
pub struct Exported {
    pub files: Vec<(usize, PathBuf)>,
    pub problems: usize,
    pub with_messages: usize,
}

/// Samples of incomplete problems `export` holds before it spills them to bucket files.
pub const SPILL_BYTES: usize = 256 << 20;
/// Bucket files of a spilled export: each holds about 1/64 of the rows still to group.
const SPILL_BUCKETS: u64 = 64;

/// The open-r1 export's output: one file, or numbered files of at most `per_file` problems.
struct OpenR1Files {
    out: PathBuf,
    per_file: Option<usize>,
    file: store::ParquetStream<OpenR1Row>,
    path: PathBuf,
    files: Vec<(usize, PathBuf)>,
    problems: usize,
    with_messages: usize,
}

impl OpenR1Files {
    fn open(out: &Path, per_file: Option<usize>, index: usize) -> Result<(store::ParquetStream<OpenR1Row>, PathBuf), StoreError> {
        let path = if per_file.is_some() { export_shard(out, index) } else { out.to_path_buf() };
        store::ParquetStream::create(&path, open_r1_schema(), 16).map(|file| (file, path))
    }

    fn create(out: &Path, per_file: Option<usize>) -> Result<OpenR1Files, StoreError> {
        let (file, path) = Self::open(out, per_file, 0)?;
        Ok(OpenR1Files { out: out.to_path_buf(), per_file, file, path, files: Vec::new(), problems: 0, with_messages: 0 })
    }

    fn push(&mut self, problem: OpenR1Row) -> Result<(), StoreError> {
        self.with_messages += usize::from(problem.messages.is_some());
        self.problems += 1;
        self.file.push(problem)?;
        if self.per_file.is_some_and(|n| self.file.rows >= n) {
            let (next, next_path) = Self::open(&self.out, self.per_file, self.files.len() + 1)?;
            let full = std::mem::replace(&mut self.file, next).finish()?;
            self.files.push((full, std::mem::replace(&mut self.path, next_path)));
        }
        Ok(())
    }

    /// Closes the last file.
    fn finish(mut self) -> Result<Exported, StoreError> {
        if self.file.rows > 0 || self.files.is_empty() {
            self.files.push((self.file.finish()?, self.path));
        }
        Ok(Exported { files: self.files, problems: self.problems, with_messages: self.with_messages })
    }
}

/// Rows of an export spilled to bucket files by a hash of their problem id (JSON lines, the trace
/// once), beside the output and removed when drained or dropped.
struct Spill {
    dir: PathBuf,
    buckets: Vec<std::io::BufWriter<std::fs::File>>,
}

impl Spill {
    fn create(out: &Path) -> std::io::Result<Spill> {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("export");
        let dir = out.with_file_name(format!(".{name}.spill"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let buckets = (0..SPILL_BUCKETS)
            .map(|b| std::fs::File::create(dir.join(format!("{b:02}.jsonl"))).map(std::io::BufWriter::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Spill { dir, buckets })
    }

    fn write(&mut self, row: &Row) -> Result<(), StoreError> {
        let bucket = crate::prompts::shard_of(&row.id, SPILL_BUCKETS) as usize;
        let error = |e: &dyn std::fmt::Display| store::file_error(&self.dir, e);
        let writer = &mut self.buckets[bucket];
        serde_json::to_writer(&mut *writer, row).map_err(|e| error(&e))?;
        std::io::Write::write_all(writer, b"\n").map_err(|e| error(&e))
    }

    /// Calls `each` with every problem's samples, one bucket in memory at a time.
    fn drain(mut self, mut each: impl FnMut(Vec<Row>) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let error = |e: &dyn std::fmt::Display| store::file_error(&self.dir, e);
        for writer in &mut self.buckets {
            std::io::Write::flush(writer).map_err(|e| error(&e))?;
        }
        for b in 0..SPILL_BUCKETS {
            let path = self.dir.join(format!("{b:02}.jsonl"));
            let mut groups: BTreeMap<String, Vec<Row>> = BTreeMap::new();
            let text = std::fs::read(&path).map_err(|e| error(&e))?;
            for line in text.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                let mut row: Row = serde_json::from_slice(line).map_err(|e| error(&e))?;
                row.derive_trace();
                groups.entry(row.id.clone()).or_default().push(row);
            }
            for samples in groups.into_values() {
                each(samples)?;
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `index`-th file of a sharded export: `out`'s stem with the number, beside it.
pub fn export_shard(out: &Path, index: usize) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("export");
    out.with_file_name(format!("{stem}-{index:05}.parquet"))
}

/// Exports generation `generation` of the run data in `data` to `out` (or numbered files of at
/// most `per_file` problems), with the prompt file's per-problem fields from `info`.
///
/// Pass 1 counts each problem's successful samples; pass 2 gathers them, writing each problem as
/// soon as its last sample is read, in row groups of 16 problems. Past `spill_limit` bytes of
/// incomplete problems, the rows go to bucket files by problem instead ([`SPILL_BYTES`] by
/// default).
pub fn open_r1(
    data: &Path,
    generation: u32,
    out: &Path,
    per_file: Option<usize>,
    info: &HashMap<String, ProblemInfo>,
    spill_limit: usize,
) -> Result<Exported, StoreError> {
    let mut expected: HashMap<String, usize> = HashMap::new();
    store::for_each_row(data, generation, |row| {
        if row.status == "ok" {
            *expected.entry(row.id).or_default() += 1;
        }
        Ok(())
    })?;
    if expected.is_empty() {
        return Err(store::file_error(data, "no successful samples to export"));
    }
    let per_file = per_file.filter(|&n| n > 0);
    let mut files = OpenR1Files::create(out, per_file)?;
    // In a run stored straight through, the incomplete problems are about --concurrency samples;
    // samples spread over early and late shards (a resume with more samples, --retry-failed) can
    // be most of the run, hence the spill.
    let mut open: HashMap<String, Vec<Row>> = HashMap::new();
    let (mut open_bytes, mut spill): (usize, Option<Spill>) = (0, None);
    store::for_each_row(data, generation, |row| {
        if row.status != "ok" {
            return Ok(());
        }
        if let Some(spill) = &mut spill {
            return spill.write(&row);
        }
        let id = row.id.clone();
        open_bytes += store::row_bytes(&row);
        let samples = open.entry(id.clone()).or_default();
        samples.push(row);
        // A sample stored between the two passes (a run beside the export) leaves its problem to
        // the end, where what is open is written.
        if expected.get(&id).is_some_and(|&n| samples.len() == n) {
            let samples = open.remove(&id).unwrap_or_default();
            open_bytes -= samples.iter().map(store::row_bytes).sum::<usize>();
            files.push(open_r1_row(samples, info.get(&id)))?;
        } else if open_bytes > spill_limit {
            let mut buckets = Spill::create(out).map_err(|e| store::file_error(out, e))?;
            for row in open.drain().flat_map(|(_, rows)| rows) {
                buckets.write(&row)?;
            }
            spill = Some(buckets);
        }
        Ok(())
    })?;
    for (id, samples) in open {
        files.push(open_r1_row(samples, info.get(&id)))?;
    }
    if let Some(spill) = spill {
        spill.drain(|samples| {
            let id = samples[0].id.clone();
            files.push(open_r1_row(samples, info.get(&id)))
        })?;
    }
    if files.problems == 0 {
        return Err(store::file_error(data, "no successful samples to export (the run changed while it was read?)"));
    }
    let exported = files.finish()?;
    // Numbered files of an earlier, larger export would mix with these when the folder is loaded.
    if per_file.is_some() {
        let mut index = exported.files.len();
        while export_shard(out, index).exists() {
            let stale = export_shard(out, index);
            std::fs::remove_file(&stale).map_err(|e| store::file_error(&stale, e))?;
            index += 1;
        }
    }
    Ok(exported)
}
