//! safetensors files written one tensor at a time. The header is laid out from the names,
//! dtypes and shapes alone; then each tensor's bytes are made, written and dropped, so memory
//! holds one tensor at a time, never a whole model or optimizer state encoded at once.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

/// One tensor of a file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Entry { name: name.into(), dtype, shape }
    }

    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * (self.dtype.bitsize() / 8) as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: tensor `{name}` has {got} bytes, its shape and dtype need {expected}")]
    Size { path: PathBuf, name: String, got: usize, expected: u64 },
    #[error("writing {path}: {message}")]
    Source { path: PathBuf, message: String },
}

fn dtype_name(dtype: Dtype) -> String {
    dtype.to_string()
}

/// Writes `entries` to `path` (fsynced), asking `bytes_of(i)` for the little-endian bytes of
/// entry `i` when it is its turn. Returns the bytes of tensor data written.
pub fn write(
    path: &Path,
    entries: &[Entry],
    metadata: Option<&BTreeMap<String, String>>,
    mut bytes_of: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<u64, TensorFileError> {
    let io = |source| TensorFileError::Io { path: path.to_path_buf(), source };
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    }
    let mut offset = 0u64;
    for entry in entries {
        let end = offset + entry.bytes();
        header.insert(
            entry.name.clone(),
            serde_json::json!({"dtype": dtype_name(entry.dtype), "shape": entry.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).expect("JSON values serialize");
    // The data starts on an 8-byte boundary, as safetensors pads its header.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut file = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    file.write_all(&header).map_err(io)?;
    for (index, entry) in entries.iter().enumerate() {
        let bytes = bytes_of(index).map_err(|message| TensorFileError::Source { path: path.to_path_buf(), message })?;
        if bytes.len() as u64 != entry.bytes() {
            return Err(TensorFileError::Size { path: path.to_path_buf(), name: entry.name.clone(), got: bytes.len(), expected: entry.bytes() });
        }
        file.write_all(&bytes).map_err(io)?;
    }
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(offset)
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice::<f32, u8>(values).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let entries = vec![
            Entry::new("b", Dtype::F32, vec![2, 3]),
            Entry::new("a", Dtype::BF16, vec![3]),
            Entry::new("empty", Dtype::F32, vec![0]),
        ];
        let metadata: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let written = write(&path, &entries, Some(&metadata), |i| {
            Ok(match i {
                0 => f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                1 => [1.0f32, 2.0, 3.0].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                _ => Vec::new(),
            })
        })
        .unwrap();
        assert_eq!(written, 24 + 6);
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.tensor("b").unwrap().shape(), &[2, 3]);
        assert_eq!(tensors.tensor("b").unwrap().data(), &f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[..]);
        assert_eq!(tensors.tensor("a").unwrap().dtype(), Dtype::BF16);
        let wrong = write(&path, &entries[..1], None, |_| Ok(vec![0; 3]));
        assert!(matches!(wrong, Err(TensorFileError::Size { .. })));
    }
}
