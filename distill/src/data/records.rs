//! Rows of JSONL or Parquet files (a file, a folder of shards, or a glob) as JSON objects,
//! each remembering the file and row it came from so that errors can name them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a JSON object: {message}")]
    Json { path: PathBuf, line: usize, message: String },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: no data files (expected .jsonl, .json or .parquet)")]
    NoFiles { path: PathBuf },
    #[error("{path}: no rows")]
    Empty { path: PathBuf },
    #[error("{location}: field `{field}`: {message}")]
    Field { location: String, field: String, message: String },
}

/// One row and where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub file: PathBuf,
    /// 1-based line for JSONL, 0-based row index for Parquet (as pandas and polars number them).
    pub row: usize,
    pub fields: Map<String, Value>,
}

impl Record {
    /// `file:line` for JSONL, `file row N` for Parquet.
    pub fn location(&self) -> String {
        if is_parquet(&self.file) {
            format!("{} row {}", self.file.display(), self.row)
        } else {
            format!("{}:{}", self.file.display(), self.row)
        }
    }

    pub fn field_error(&self, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field { location: self.location(), field: field.to_string(), message: message.into() }
    }

    /// A required string field.
    pub fn string(&self, field: &str) -> Result<&str, DataError> {
        match self.fields.get(field) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(self.field_error(field, "missing")),
            Some(other) => Err(self.field_error(field, format!("expected a string, got {}", type_name(other)))),
        }
    }
}

pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

fn is_data_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet" || e == "jsonl" || e == "json")
}

/// The data files named by `spec`: a file, a folder (its data files, sorted), or a glob.
pub fn data_files(spec: &Path) -> Result<Vec<PathBuf>, DataError> {
    let text = spec.to_string_lossy();
    let mut files: Vec<PathBuf> = if text.contains(['*', '?', '[']) {
        glob::glob(&text)
            .map_err(|e| DataError::Io { path: spec.into(), source: std::io::Error::other(e.to_string()) })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    } else if spec.is_dir() {
        std::fs::read_dir(spec)
            .map_err(|source| DataError::Io { path: spec.into(), source })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_data_file(p))
            .collect()
    } else if spec.exists() {
        vec![spec.to_path_buf()]
    } else {
        return Err(DataError::Io { path: spec.into(), source: std::io::Error::from(std::io::ErrorKind::NotFound) });
    };
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoFiles { path: spec.into() });
    }
    Ok(files)
}

/// Every row of every file named by `spec`, in order. An empty dataset is an error.
pub fn read_records(spec: &Path) -> Result<Vec<Record>, DataError> {
    let mut records = Vec::new();
    stream_records(spec, |record| {
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// Calls `each` with every row of every file named by `spec`, in order, holding one Parquet
/// record batch (or one JSONL line) in memory at a time. Returns the number of rows; an empty
/// dataset is an error.
pub fn stream_records(spec: &Path, mut each: impl FnMut(Record) -> Result<(), DataError>) -> Result<usize, DataError> {
    let mut count = 0;
    for file in data_files(spec)? {
        let mut counted = |record: Record| {
            count += 1;
            each(record)
        };
        if is_parquet(&file) {
            read_parquet(&file, &mut counted)?;
        } else {
            read_jsonl(&file, &mut counted)?;
        }
    }
    if count == 0 {
        return Err(DataError::Empty { path: spec.into() });
    }
    Ok(count)
}

fn read_jsonl(path: &Path, each: &mut impl FnMut(Record) -> Result<(), DataError>) -> Result<(), DataError> {
    let file = File::open(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|source| DataError::Io { path: path.into(), source })?;
        let number = index + 1;
        let text = std::str::from_utf8(&line).map_err(|e| DataError::Json {
            path: path.into(),
            line: number,
            message: format!("invalid UTF-8 ({e})"),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => each(Record { file: path.into(), row: number, fields })?,
            Ok(other) => {
                return Err(DataError::Json {
                    path: path.into(),
                    line: number,
                    message: format!("got {}", type_name(&other)),
                });
            }
            Err(e) => return Err(DataError::Json { path: path.into(), line: number, message: e.to_string() }),
        }
    }
    Ok(())
}

fn read_parquet(path: &Path, each: &mut impl FnMut(Record) -> Result<(), DataError>) -> Result<(), DataError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let parquet_error = |message: String| DataError::Parquet { path: path.into(), message };
    let file = File::open(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    // Small batches: long traces make a default-sized batch hundreds of megabytes of text.
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parquet_error(e.to_string()))?
        .with_batch_size(256)
        .build()
        .map_err(|e| parquet_error(e.to_string()))?;
    let mut row = 0;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_error(e.to_string()))?;
        // arrow-json turns any Arrow type (lists of structs for `messages`, large strings…)
        // into the same JSON a JSONL file would hold.
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| parquet_error(e.to_string()))?;
        writer.finish().map_err(|e| parquet_error(e.to_string()))?;
        let rows: Vec<Map<String, Value>> =
            serde_json::from_slice(&writer.into_inner()).map_err(|e| parquet_error(e.to_string()))?;
        for fields in rows {
            each(Record { file: path.into(), row, fields })?;
            row += 1;
        }
    }
    Ok(())
}
