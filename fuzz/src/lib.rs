//! Helpers shared by the fuzz targets (`fuzz_targets/`) and the seed generator (`examples/`).
use lowbit::quant::checkpoint::Entry;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The name parsers get for in-memory input (it only appears in error messages).
pub const NAME: &str = "fuzz.safetensors";

/// A scratch folder for the round trips that go through a file, in `TMPDIR` (`run.sh` points
/// it at a folder in RAM and removes it afterwards: libFuzzer exits without running destructors).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lowbit-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create a scratch folder");
        dir
    })
}

/// A fresh path in the scratch folder.
pub fn scratch_file(name: &str) -> PathBuf {
    scratch().join(name)
}

/// Whether two loaded checkpoints hold the same tensors, in the same order.
pub fn same_entries(a: &[(String, Entry)], b: &[(String, Entry)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((na, ea), (nb, eb))| {
            na == nb
                && match (ea, eb) {
                    (
                        Entry::Quantized {
                            tensor: ta,
                            dtype: da,
                        },
                        Entry::Quantized {
                            tensor: tb,
                            dtype: db,
                        },
                    ) => ta == tb && da == db,
                    (
                        Entry::Raw {
                            dtype: da,
                            shape: sa,
                            data: xa,
                        },
                        Entry::Raw {
                            dtype: db,
                            shape: sb,
                            data: xb,
                        },
                    ) => da == db && sa == sb && xa == xb,
                    _ => false,
                }
        })
}

/// Graph inputs for `from_layers`: names and shapes.
pub type Inputs = Vec<(String, Vec<u64>)>;

/// The BERT input of the `model` target: a little-endian u16 length, that many bytes of
/// `config.json`, then `model.safetensors`.
pub fn split_bert(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let n = u16::from_le_bytes(*len) as usize;
    (rest.len() >= n).then(|| rest.split_at(n))
}

/// The inverse of `split_bert`.
pub fn join_bert(config: &[u8], file: &[u8]) -> Vec<u8> {
    let n = u16::try_from(config.len()).expect("a seed config under 64 KiB");
    [&n.to_le_bytes()[..], config, file].concat()
}
