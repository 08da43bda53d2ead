//! Tokenized training data, cached on disk and memory-mapped.
//!
//! Tokenizing 800k reasoning traces takes a while and their text would not fit in memory, so
//! the rows are streamed from their files a chunk at a time, tokenized on all cores, and their
//! token ids written to a cache folder: `tokens.u32` (every example's ids, end to end),
//! `trained.u8` (its loss mask) and `offsets.u64` (where each example starts), with
//! `meta.json` saying what was counted and skipped. Training reads the ids through a memory
//! map, so host memory holds an offset per example, not the data.
//!
//! The folder is named by a hash of what decides its contents: the data files (path, size and
//! modification time), the tokenizer's files, the trace options and this format's version. A
//! second run on the same data, and `--resume`, reuse it. It is written under a temporary name
//! and renamed into place, so a kill leaves no half-written cache; one that is damaged anyway
//! (truncated, edited) fails its checks on opening and is rebuilt, with a message.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::records::{DataError, Record, data_files, stream_records};
use super::traces::{Skipped, SftExample, TraceOptions, tokenize_record};
use crate::text::Tokenizer;

/// Bumped whenever the files' layout or the tokenization changes.
const FORMAT_VERSION: u32 = 1;

/// Rows tokenized together on all cores.
const CHUNK_ROWS: usize = 512;

/// Files of a tokenizer folder that decide its tokens.
const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "tokenizer.json.gz", "tokenizer_config.json", "chat_template.jinja"];

/// What the cache folder says about its data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub version: u32,
    /// Rows read from the data files.
    pub rows: usize,
    pub examples: usize,
    pub tokens: u64,
    pub skipped: Skipped,
    /// The data files and options the cache was made from, for people reading it.
    pub source: serde_json::Value,
}

/// Tokenized examples, memory-mapped from a cache folder.
pub struct TokenizedData {
    pub dir: PathBuf,
    pub meta: Meta,
    /// The largest token id (0 for no tokens), checked against the model's vocabulary.
    pub max_id: u32,
    tokens: Option<memmap2::Mmap>,
    trained: Option<memmap2::Mmap>,
    offsets: Vec<u64>,
}

/// How the data was obtained.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheOutcome {
    Reused,
    Built,
    /// The cache folder was there but damaged: why.
    Rebuilt(String),
}

impl TokenizedData {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of example `index`.
    pub fn example_len(&self, index: usize) -> usize {
        (self.offsets[index + 1] - self.offsets[index]) as usize
    }

    /// Every example's token ids, end to end (a page-aligned map, so it casts to `u32`s; the
    /// file is in the machine's own byte order, as a cache is local to its machine).
    fn ids(&self) -> &[u32] {
        self.tokens.as_deref().map_or(&[], bytemuck::cast_slice)
    }

    /// Example `index`, read from the map.
    pub fn example(&self, index: usize) -> SftExample {
        let (start, end) = (self.offsets[index] as usize, self.offsets[index + 1] as usize);
        let trained = self.trained.as_deref().unwrap_or_default();
        SftExample { input_ids: self.ids()[start..end].to_vec(), trained: trained[start..end].iter().map(|&t| t != 0).collect() }
    }

    /// Opens a cache folder, checking that its files agree with each other and with `vocab`.
    fn open(dir: &Path, vocab: usize) -> Result<Self, String> {
        let text = fs::read_to_string(dir.join("meta.json")).map_err(|e| format!("meta.json: {e}"))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| format!("meta.json: {e}"))?;
        if meta.version != FORMAT_VERSION {
            return Err(format!("format version {} (this build writes {FORMAT_VERSION})", meta.version));
        }
        let map = |name: &str, bytes: u64| -> Result<Option<memmap2::Mmap>, String> {
            let file = File::open(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
            let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
            if size != bytes {
                return Err(format!("{name} has {size} bytes, meta.json says {bytes}"));
            }
            if size == 0 {
                return Ok(None);
            }
            // SAFETY: cache files are written once under a temporary name and never modified
            // after the rename that publishes them.
            unsafe { memmap2::Mmap::map(&file) }.map(Some).map_err(|e| format!("{name}: {e}"))
        };
        let tokens = map("tokens.u32", meta.tokens * 4)?;
        let trained = map("trained.u8", meta.tokens)?;
        let offsets_bytes = fs::read(dir.join("offsets.u64")).map_err(|e| format!("offsets.u64: {e}"))?;
        if offsets_bytes.len() != (meta.examples + 1) * 8 {
            return Err(format!("offsets.u64 has {} bytes for {} examples", offsets_bytes.len(), meta.examples));
        }
        let offsets: Vec<u64> = offsets_bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        if offsets[0] != 0 || offsets.windows(2).any(|w| w[1] <= w[0]) || offsets[meta.examples] != meta.tokens {
            return Err("offsets.u64 is not an increasing list of example starts".into());
        }
        let mut data = TokenizedData { dir: dir.to_path_buf(), meta, max_id: 0, tokens, trained, offsets };
        // One pass at memory speed (seconds for 800k traces): garbage ids would index past the
        // embeddings.
        data.max_id = data.ids().iter().copied().max().unwrap_or(0);
        if data.max_id as usize >= vocab {
            return Err(format!("token id {} is outside the tokenizer's {vocab}-entry vocabulary", data.max_id));
        }
        Ok(data)
    }
}

/// The cache folder name for this data, tokenizer and options.
pub fn cache_key(spec: &Path, tokenizer_dir: &Path, options: &TraceOptions) -> Result<(String, serde_json::Value), DataError> {
    let mut hash = Sha256::new();
    let mut files = Vec::new();
    for file in data_files(spec)? {
        let metadata = fs::metadata(&file).map_err(|source| DataError::Io { path: file.clone(), source })?;
        let modified = metadata.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let path = fs::canonicalize(&file).unwrap_or(file);
        hash.update(format!("{}\0{}\0{modified}\0", path.display(), metadata.len()));
        files.push(path.display().to_string());
    }
    for name in TOKENIZER_FILES {
        if let Ok(bytes) = fs::read(tokenizer_dir.join(name)) {
            hash.update(name);
            hash.update(&bytes);
        }
    }
    let options_text = format!("{options:?}");
    hash.update(format!("{options_text}\0{FORMAT_VERSION}"));
    let digest = hash.finalize();
    let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok((key, serde_json::json!({"files": files, "tokenizer": tokenizer_dir, "options": options_text})))
}

/// The tokenized data of `spec`: from `root/KEY/` when it is there and sound, else tokenized
/// now (on all cores) and cached there. `progress(rows)` is told how many rows are done.
pub fn load_or_build(
    spec: &Path,
    tokenizer: &Tokenizer,
    tokenizer_dir: &Path,
    options: &TraceOptions,
    root: &Path,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(TokenizedData, CacheOutcome), DataError> {
    let (key, source) = cache_key(spec, tokenizer_dir, options)?;
    let dir = root.join(&key);
    let vocab = tokenizer.vocab_size();
    let damaged = if dir.exists() {
        match TokenizedData::open(&dir, vocab) {
            Ok(data) => return Ok((data, CacheOutcome::Reused)),
            Err(reason) => {
                fs::remove_dir_all(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
                Some(reason)
            }
        }
    } else {
        None
    };
    build(spec, tokenizer, options, &dir, source, progress)?;
    let data = TokenizedData::open(&dir, vocab).map_err(|message| DataError::Field {
        location: dir.display().to_string(),
        field: "token cache".into(),
        message: format!("unreadable right after writing it: {message}"),
    })?;
    Ok((data, damaged.map_or(CacheOutcome::Built, CacheOutcome::Rebuilt)))
}

/// Token files being written under a temporary folder.
struct Writers {
    tokens: BufWriter<File>,
    trained: BufWriter<File>,
    offsets: BufWriter<File>,
    total: u64,
    examples: usize,
}

impl Writers {
    fn push(&mut self, example: &SftExample) -> std::io::Result<()> {
        self.tokens.write_all(bytemuck::cast_slice(&example.input_ids))?;
        let mask: Vec<u8> = example.trained.iter().map(|&t| u8::from(t)).collect();
        self.trained.write_all(&mask)?;
        self.total += example.len() as u64;
        self.offsets.write_all(&self.total.to_le_bytes())?;
        self.examples += 1;
        Ok(())
    }
}

fn build(
    spec: &Path,
    tokenizer: &Tokenizer,
    options: &TraceOptions,
    dir: &Path,
    source: serde_json::Value,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(), DataError> {
    let parent = dir.parent().expect("a cache folder has a parent");
    fs::create_dir_all(parent).map_err(|source| DataError::Io { path: parent.into(), source })?;
    let prefix = format!(".{}.partial-", dir.file_name().expect("named").to_string_lossy());
    let staging = crate::staging::folder(parent, &prefix);
    crate::staging::or_remove(&staging, || write_cache(spec, tokenizer, options, &staging, dir, source, progress))
}

fn write_cache(
    spec: &Path,
    tokenizer: &Tokenizer,
    options: &TraceOptions,
    staging: &Path,
    dir: &Path,
    source: serde_json::Value,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(), DataError> {
    let staging = staging.to_path_buf();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path: path.clone(), source }
    };
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    let create = |name: &str| File::create(staging.join(name)).map(|f| BufWriter::with_capacity(1 << 20, f)).map_err(io(&staging.join(name)));
    let mut writers = Writers { tokens: create("tokens.u32")?, trained: create("trained.u8")?, offsets: create("offsets.u64")?, total: 0, examples: 0 };
    writers.offsets.write_all(&0u64.to_le_bytes()).map_err(io(&staging))?;
    let mut skipped = Skipped::default();
    let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK_ROWS);
    let mut done = 0;
    let mut flush = |chunk: &mut Vec<Record>, writers: &mut Writers, skipped: &mut Skipped| -> Result<(), DataError> {
        let outcomes: Vec<_> = chunk.par_iter().map(|record| tokenize_record(record, tokenizer, options)).collect::<Result<_, _>>()?;
        for outcome in outcomes {
            if let Some(example) = skipped.count(outcome) {
                writers.push(&example).map_err(io(&staging))?;
            }
        }
        done += chunk.len();
        progress(done);
        chunk.clear();
        Ok(())
    };
    let rows = stream_records(spec, |record| {
        chunk.push(record);
        if chunk.len() == CHUNK_ROWS {
            flush(&mut chunk, &mut writers, &mut skipped)?;
        }
        Ok(())
    })?;
    flush(&mut chunk, &mut writers, &mut skipped)?;
    for writer in [writers.tokens, writers.trained, writers.offsets] {
        let file = writer.into_inner().map_err(|e| DataError::Io { path: staging.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io(&staging))?;
    }
    let meta = Meta { version: FORMAT_VERSION, rows, examples: writers.examples, tokens: writers.total, skipped, source };
    let meta_path = staging.join("meta.json");
    fs::write(&meta_path, serde_json::to_string_pretty(&meta).expect("plain struct")).map_err(io(&meta_path))?;
    File::open(&meta_path).and_then(|f| f.sync_all()).map_err(io(&meta_path))?;
    match fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        // Another process cached the same data first: its files are the same as ours.
        Err(_) if dir.join("meta.json").exists() => fs::remove_dir_all(&staging).map_err(io(&staging)),
        Err(source) => Err(DataError::Io { path: dir.into(), source }),
    }
}

/// Where tokenized data is cached unless told otherwise: `$DISTILL_CACHE`, else
/// `$XDG_CACHE_HOME/r1-distill`, else `~/.cache/r1-distill`, then `tokenized/`.
pub fn default_root() -> PathBuf {
    let base = std::env::var_os("DISTILL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("r1-distill")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/r1-distill")))
        .unwrap_or_else(|| PathBuf::from(".r1-distill-cache"));
    base.join("tokenized")
}
