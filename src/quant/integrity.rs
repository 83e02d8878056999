//! The SHA-256 that every safetensors file lowbit writes carries, and its check on load.
//!
//! The metadata key `lowbit.sha256` holds the lowercase hex SHA-256 of the whole file as written
//! (8-byte header length, JSON header, tensor data) with the 64 digits of the value itself
//! replaced by ASCII `0`s. It covers the tensor data and the header (names, dtypes, shapes,
//! offsets, metadata), is one pass over the file, and lets the writer stream the data and patch
//! the digest into the header afterwards. Files without the key (other tools') load unchecked,
//! unless their metadata carries any other `lowbit.` key: a file lowbit marks as its own must
//! carry its digest, so renaming or deleting the key cannot switch the check off.
//!
//! The header is serialized with its metadata in key order, so the same tensors and metadata
//! always give the same bytes.
use super::checkpoint::write_atomic_with;
use crate::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use serde::ser::{Serialize, SerializeMap, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

pub const SHA256_KEY: &str = "lowbit.sha256";
/// Metadata keys under this prefix are lowbit's: a file with any of them must carry `SHA256_KEY`.
pub const LOWBIT_PREFIX: &str = "lowbit.";
const ZEROS: [u8; 64] = [b'0'; 64];

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lowercase hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Where the digits of `digest` sit in the header bytes, as lowbit writes them.
fn digest_at(header: &[u8], digest: &str) -> Option<usize> {
    let pat = format!("\"{SHA256_KEY}\":\"{digest}\"");
    // The quotes around the key cannot come from a string value (those are escaped), so the
    // first match is the metadata entry.
    let i = header
        .windows(pat.len())
        .position(|w| w == pat.as_bytes())?;
    Some(i + pat.len() - 65)
}

/// A safetensors header as lowbit writes it: `__metadata__` first, its keys in order (a
/// `HashMap`, which safetensors' own `Metadata` serializes, would order them anew on each run),
/// then the tensors in data order.
struct Header<'a> {
    meta: &'a BTreeMap<String, String>,
    tensors: &'a [(String, TensorInfo)],
}

impl Serialize for Header<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry("__metadata__", self.meta)?;
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

/// Writes `tensors` and `meta` as a safetensors file carrying its `SHA256_KEY`, atomically.
/// Tensor data streams from the views into the file: only the header is built in memory. The
/// same tensors and metadata give the same bytes.
pub fn write(
    path: &Path,
    mut tensors: Vec<(String, TensorView<'_>)>,
    mut meta: BTreeMap<String, String>,
) -> Result<()> {
    meta.insert(
        SHA256_KEY.to_string(),
        String::from_utf8(ZEROS.to_vec()).expect("ASCII"),
    );
    // safetensors' own order (descending dtype alignment, then name) keeps every tensor aligned.
    tensors.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, t)| {
            let n = t.data().len();
            offset += n;
            let info = TensorInfo {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data_offsets: (offset - n, offset),
            };
            (name.clone(), info)
        })
        .collect::<Vec<_>>();
    // safetensors' checks (offsets in order); its serialization is not used (see `Header`).
    Metadata::new(None, infos.clone())
        .map_err(|e| Error::value(format!("cannot serialize: {e}")))?;
    let header = Header {
        meta: &meta,
        tensors: &infos,
    };
    let mut header = serde_json::to_vec(&header).expect("plain data serializes");
    header.resize(header.len().next_multiple_of(8), b' ');
    let at = 8 + digest_at(&header, std::str::from_utf8(&ZEROS).expect("ASCII"))
        .expect("the header holds the placeholder");
    write_atomic_with(path, |f| {
        let mut sha = Sha256::new();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *f);
        let len = (header.len() as u64).to_le_bytes();
        for part in [&len[..], &header]
            .into_iter()
            .chain(tensors.iter().map(|(_, t)| t.data()))
        {
            sha.update(part);
            w.write_all(part)?;
        }
        w.flush()?;
        drop(w);
        f.seek(SeekFrom::Start(at as u64))?;
        f.write_all(hex(&sha.finalize()).as_bytes())
    })
}

/// Checks `bytes` (a whole safetensors file whose header is `header_len` bytes and whose
/// metadata is `meta`) against its `SHA256_KEY`. A file without the key passes only when no
/// metadata key is lowbit's (`LOWBIT_PREFIX`): other tools' files load unchecked, but one lowbit
/// marked as its own whose digest was removed or renamed is refused (except in fuzzing builds,
/// `--cfg fuzzing`, whose unsealed seeds let mutations reach the parsers behind the digest,
/// which anyone can recompute).
#[allow(unexpected_cfgs)] // `fuzzing` is set by cargo-fuzz
pub fn verify(
    bytes: &[u8],
    header_len: usize,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let Some(want) = meta.get(SHA256_KEY) else {
        let mut marks: Vec<&str> = meta
            .keys()
            .map(String::as_str)
            .filter(|k| k.starts_with(LOWBIT_PREFIX))
            .collect();
        if marks.is_empty() || cfg!(fuzzing) {
            return Ok(());
        }
        marks.sort_unstable();
        return Err(Error::format(format!(
            "{}: the file carries lowbit metadata ({}) but no {SHA256_KEY}: every file lowbit \
             writes has one, so the file was modified after lowbit wrote it and cannot be \
             checked (save it again with lowbit, or remove lowbit's metadata keys to load it as \
             a plain safetensors file)",
            path.display(),
            marks.join(", ")
        )));
    };
    let well_formed = want.len() == 64
        && want
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let at = well_formed
        .then(|| digest_at(&bytes[8..8 + header_len], want))
        .flatten()
        .map(|i| 8 + i);
    let ok = at.is_some_and(|at| {
        let mut sha = Sha256::new();
        sha.update(&bytes[..at]);
        sha.update(ZEROS);
        sha.update(&bytes[at + 64..]);
        hex(&sha.finalize()) == *want
    });
    if ok {
        Ok(())
    } else {
        Err(Error::format(format!(
            "{}: the tensor data and header do not match the file's SHA-256 ({SHA256_KEY}): \
             the file is corrupted or was modified after lowbit wrote it",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::checkpoint::{self, Entry};
    use safetensors::Dtype;
    use std::collections::BTreeMap;

    fn raw(data: &[f32]) -> Entry {
        Entry::Raw {
            dtype: Dtype::F32,
            shape: vec![data.len()],
            data: bytemuck::cast_slice(data).to_vec(),
        }
    }

    fn flipped(path: &Path, at: usize) -> std::path::PathBuf {
        let mut b = std::fs::read(path).unwrap();
        b[at] ^= 1;
        let p = path.with_extension("flipped");
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn a_flipped_byte_anywhere_is_an_integrity_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let extra = BTreeMap::from([("note".to_string(), "hello".to_string())]);
        let entries = vec![("b".to_string(), raw(&[1.0, 2.0, 3.0]))];
        checkpoint::save(&path, &entries, &extra).unwrap();
        assert_eq!(checkpoint::load(&path).unwrap().len(), 1);
        let bytes = std::fs::read(&path).unwrap();
        let note = bytes.windows(5).position(|w| w == b"hello").unwrap();
        for at in [bytes.len() - 1, note] {
            let err = checkpoint::load(&flipped(&path, at)).unwrap_err();
            assert!(matches!(err, Error::Format(_)), "{err}");
            assert!(
                err.to_string().contains("do not match the file's SHA-256"),
                "{err}"
            );
        }
        // lowbit's key cannot be given by the caller
        let mut bad = extra.clone();
        bad.insert(SHA256_KEY.into(), "0".repeat(64));
        assert!(checkpoint::save(&path, &entries, &bad).is_err());
    }

    #[test]
    fn files_without_the_key_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hf.safetensors");
        let data = [1f32, 2.0];
        let t = TensorView::new(Dtype::F32, vec![2], bytemuck::cast_slice(&data)).unwrap();
        std::fs::write(&path, safetensors::serialize([("x", t)], None).unwrap()).unwrap();
        let map = checkpoint::map_file(&path).unwrap();
        checkpoint::parse(&map, &path).unwrap();
    }

    #[test]
    fn a_lowbit_file_without_its_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let entries = vec![("w".to_string(), raw(&[1.0, 2.0, 3.0]))];
        checkpoint::save(&path, &entries, &BTreeMap::new()).unwrap();
        // The key renamed (same length: the header stays valid) and a value set to +inf.
        let mut b = std::fs::read(&path).unwrap();
        let at = b
            .windows(13)
            .position(|w| w == SHA256_KEY.as_bytes())
            .unwrap();
        b[at + 12] = b'4';
        let n = b.len();
        b[n - 4..].copy_from_slice(&f32::INFINITY.to_le_bytes());
        let bad = dir.path().join("renamed.safetensors");
        std::fs::write(&bad, &b).unwrap();
        let err = checkpoint::load(&bad).unwrap_err();
        assert!(matches!(err, Error::Format(_)), "{err}");
        assert!(
            err.to_string().contains("no lowbit.sha256")
                && err.to_string().contains("lowbit.format"),
            "{err}"
        );
        // Removed: any lowbit key marks the file, not only lowbit.format.
        let data = [1f32, 2.0];
        let t = TensorView::new(Dtype::F32, vec![2], bytemuck::cast_slice(&data)).unwrap();
        let meta = HashMap::from([("lowbit.multitask".to_string(), "{}".to_string())]);
        std::fs::write(
            &bad,
            safetensors::serialize([("x", t)], Some(meta)).unwrap(),
        )
        .unwrap();
        let map = checkpoint::map_file(&bad).unwrap();
        let err = checkpoint::parse(&map, &bad).unwrap_err();
        assert!(err.to_string().contains("lowbit.multitask"), "{err}");
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let extra: BTreeMap<String, String> = (0..16)
            .map(|i| (format!("key{i}"), format!("value{i}")))
            .collect();
        let entries = vec![
            ("b".to_string(), raw(&[1.0, 2.0, 3.0])),
            ("a".to_string(), raw(&[4.0])),
        ];
        let bytes: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let p = dir.path().join(format!("{i}.safetensors"));
                checkpoint::save(&p, &entries, &extra).unwrap();
                std::fs::read(&p).unwrap()
            })
            .collect();
        assert!(bytes.windows(2).all(|w| w[0] == w[1]));
        let text = String::from_utf8_lossy(&bytes[0]);
        let keys: Vec<usize> = ["key0\"", "key1\"", "key10\"", "key2\"", SHA256_KEY]
            .iter()
            .map(|k| text.find(k).unwrap())
            .collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "metadata in key order"
        );
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        checkpoint::write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half of the new")?;
            Err(std::io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn terabyte_claims_fail_fast() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let header =
            br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}"#;
        for (n, body) in [(1u64 << 60, &b"{}"[..]), (header.len() as u64, &header[..])] {
            let mut b = n.to_le_bytes().to_vec();
            b.extend_from_slice(body);
            std::fs::write(&path, &b).unwrap();
            let err = checkpoint::load(&path).unwrap_err();
            assert!(matches!(err, Error::Format(_)), "{err}");
            assert!(
                err.to_string().contains("not a valid safetensors file"),
                "{err}"
            );
            assert!(checkpoint::metadata(&path).is_err());
        }
    }
}
