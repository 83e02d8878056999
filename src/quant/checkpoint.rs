//! The quantized safetensors format and whole-checkpoint (de)quantization.
//!
//! A quantized tensor `name` is stored as three tensors, `name.codes` (U8, the packed codes),
//! `name.scales` (F32) and `name.zero_points` (I8 for symmetric specs, U8 otherwise), plus an
//! entry in the JSON metadata key `lowbit.quantized` with its shape, original dtype and spec.
//! Every other tensor is copied unchanged. Files are written atomically (temp file + rename)
//! and carry a SHA-256 (`integrity::SHA256_KEY`) that every load checks.
use super::affine::Codes;
use super::elem::Elem;
use super::integrity::{self, SHA256_KEY};
use super::spec::{quantize, Granularity, QuantSpec, QuantizedTensor};
use crate::{ensure, Error, Result};
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT_KEY: &str = "lowbit.format";
pub const FORMAT: &str = "quantized-v1";
pub const QUANTIZED_KEY: &str = "lowbit.quantized";
/// Names of weights stored as BitNet ternary codes (2-bit symmetric per-tensor codes in
/// {-1, 0, 1}, the scale their absmean) that the runtime runs on the packed ternary kernel.
pub const TERNARY_KEY: &str = "lowbit.ternary";

/// The metadata of `meta` that describes models rather than lowbit's storage of tensors
/// (configs, a `format` tag), which a converted file carries over.
fn user_metadata(meta: &HashMap<String, String>) -> BTreeMap<String, String> {
    meta.iter()
        .filter(|(k, _)| {
            ![FORMAT_KEY, QUANTIZED_KEY, TERNARY_KEY, SHA256_KEY].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What the metadata records for each quantized tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantizedInfo {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub spec: QuantSpec,
}

/// A tensor of a checkpoint: quantized, or kept as raw bytes.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a handful per checkpoint; boxing buys nothing
pub enum Entry {
    Quantized {
        tensor: QuantizedTensor,
        dtype: Dtype,
    },
    Raw {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    },
}

/// One row of the table `lowbit quantize` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// `None` when the tensor was copied unchanged.
    pub bits: Option<u32>,
    /// Signal-to-quantization-noise ratio in dB (`inf` when exact).
    pub sqnr_db: Option<f64>,
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// Float data of a safetensors tensor, borrowed when aligned, copied otherwise.
pub(crate) enum FloatData<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
    F16(Cow<'a, [f16]>),
    BF16(Cow<'a, [bf16]>),
}

fn cast<'a, T: bytemuck::Pod>(b: &'a [u8]) -> Cow<'a, [T]> {
    match bytemuck::try_cast_slice(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(b)),
    }
}

pub(crate) fn float_data<'a>(t: &TensorView<'a>) -> Option<FloatData<'a>> {
    Some(match t.dtype() {
        Dtype::F32 => FloatData::F32(cast(t.data())),
        Dtype::F64 => FloatData::F64(cast(t.data())),
        Dtype::F16 => FloatData::F16(cast(t.data())),
        Dtype::BF16 => FloatData::BF16(cast(t.data())),
        _ => return None,
    })
}

fn view<'a, E>(data: &'a [E], shape: &[usize]) -> Result<ArrayViewD<'a, E>> {
    ArrayViewD::from_shape(IxDyn(shape), data).map_err(|e| {
        Error::format(format!(
            "tensor data does not match its shape {shape:?}: {e}"
        ))
    })
}

/// Quantizes one float tensor and measures its SQNR.
fn quantize_one<E: Elem>(
    data: &[E],
    shape: &[usize],
    spec: QuantSpec,
) -> Result<(QuantizedTensor, f64)> {
    let x = view(data, shape)?;
    let q = quantize(x.view(), spec, None)?;
    let xh = q.dequantize()?;
    Ok((q, sqnr_db(&x, &xh.view())))
}

/// `10 log10(Σx² / Σ(x - x̂)²)`, computed in f64; `inf` when the reconstruction is exact.
pub fn sqnr_db<E: Elem>(x: &ArrayViewD<'_, E>, xh: &ArrayViewD<'_, f32>) -> f64 {
    let (mut sig, mut err) = (0f64, 0f64);
    for (a, b) in x.iter().zip(xh.iter()) {
        let a = a.to_f32() as f64;
        sig += a * a;
        err += (a - *b as f64).powi(2);
    }
    if err == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / err).log10()
    }
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

fn parse_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        _ => {
            return Err(Error::format(format!(
                "unsupported original dtype {s:?} in metadata"
            )))
        }
    })
}

/// A safetensors dtype from its name (`"F32"`, `"I64"`, ...), as `{:?}` prints it.
pub fn dtype_from_name(s: &str) -> Option<Dtype> {
    use Dtype::*;
    [
        BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64,
    ]
    .into_iter()
    .find(|d| dtype_name(*d) == s)
}

/// The string metadata of a safetensors file's header (nothing else is read, so its
/// `SHA256_KEY` is not checked: loading the tensors does that).
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let map = map_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| invalid(&map, e, path))?;
    Ok(meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Maps a file read-only. The map is only read, and files are replaced by rename, never rewritten.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    // SAFETY: read-only map; lowbit never writes to a file in place.
    unsafe { memmap2::Mmap::map(&f) }
        .map_err(|e| Error::io(format!("cannot map {}", path.display()), e))
}

/// Lets the kernel drop the pages of `part` (a slice of `map`) from this process: they were
/// read and are not needed again, so resident memory stays near one tensor, not the file.
fn release(map: &memmap2::Mmap, part: &[u8]) {
    #[cfg(unix)]
    if let Some(offset) = (part.as_ptr() as usize).checked_sub(map.as_ptr() as usize) {
        // SAFETY: a read-only map of a file lowbit never writes in place: a dropped page reads
        // back the same bytes on the next access.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, part.len())
        };
    }
}

/// A `Format` error for a file safetensors refuses; claims of more bytes than the file holds
/// (a huge header length, shapes or offsets) are refused before anything is allocated.
fn invalid(bytes: &[u8], e: safetensors::SafeTensorError, path: &Path) -> Error {
    use safetensors::SafeTensorError::*;
    let claimed = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let why = match e {
        HeaderTooLarge | InvalidHeaderLength => format!(
            "its header length field claims {claimed} bytes (the file has {}; at most 100 MB)",
            bytes.len()
        ),
        MetadataIncompleteBuffer | ValidationOverflow | TensorInvalidInfo => {
            format!("{e}: its header describes other tensor data than the file holds")
        }
        e => e.to_string(),
    };
    Error::format(format!(
        "{} is not a valid safetensors file: {why}",
        path.display()
    ))
}

/// Parses a safetensors file and checks its `SHA256_KEY` when it has one.
pub(crate) fn parse<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| invalid(bytes, e, path))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    integrity::verify(bytes, n, &meta, path)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| invalid(bytes, e, path))?;
    Ok((st, meta))
}

/// Which tensors of a checkpoint `quantize_file_filtered` quantizes, by name: those matching
/// one of `include` (every tensor when it is empty) and none of `exclude`. A pattern is an exact
/// name or a glob with Python's `fnmatch.fnmatchcase` rules (`*`, `?`, `[seq]`, `[!seq]`; case
/// matters and `*` crosses dots).
#[derive(Clone, Debug, Default)]
pub struct TensorFilter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl TensorFilter {
    /// Whether `name` is to be quantized (if it is a floating 2-D tensor).
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| glob_match(p, name)))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }
}

/// One element of a glob pattern.
enum Glob {
    Star,
    Any,
    Lit(char),
    /// `[...]`: single characters and inclusive ranges, or their complement.
    Class(bool, Vec<(char, char)>),
}

/// `pattern` as `Glob` elements, with `fnmatch.translate`'s rules: a `[` without its `]` is a
/// literal; `!` first negates; a `]` right after `[` or `[!` is a member; `a-z` is a range, and a
/// reversed range is empty.
fn glob_parse(pattern: &str) -> Vec<Glob> {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let c = p[i];
        i += 1;
        match c {
            '*' => {
                if !matches!(out.last(), Some(Glob::Star)) {
                    out.push(Glob::Star)
                }
            }
            '?' => out.push(Glob::Any),
            '[' => {
                let mut j = i;
                if p.get(j) == Some(&'!') {
                    j += 1;
                }
                if p.get(j) == Some(&']') {
                    j += 1;
                }
                while j < p.len() && p[j] != ']' {
                    j += 1;
                }
                if j >= p.len() {
                    out.push(Glob::Lit('['));
                    continue;
                }
                let mut body = &p[i..j];
                i = j + 1;
                let negated = body.first() == Some(&'!');
                if negated {
                    body = &body[1..];
                }
                let mut members = Vec::new();
                let mut k = 0;
                while k < body.len() {
                    if k + 2 < body.len() && body[k + 1] == '-' {
                        members.push((body[k], body[k + 2]));
                        k += 3;
                    } else {
                        members.push((body[k], body[k]));
                        k += 1;
                    }
                }
                out.push(Glob::Class(negated, members));
            }
            c => out.push(Glob::Lit(c)),
        }
    }
    out
}

/// Whether the whole of `name` matches `pattern` (see `TensorFilter`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let g = glob_parse(pattern);
    let s: Vec<char> = name.chars().collect();
    let one = |e: &Glob, c: char| match e {
        Glob::Any => true,
        Glob::Lit(l) => *l == c,
        Glob::Class(neg, m) => m.iter().any(|&(a, b)| a <= c && c <= b) != *neg,
        Glob::Star => unreachable!("a star is matched by the loop"),
    };
    // Greedy with backtracking to the last star: each element but a star takes one character.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match g.get(pi) {
            Some(Glob::Star) => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(e) if one(e, s[si]) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    g[pi..].iter().all(|e| matches!(e, Glob::Star))
}

/// Quantizes every floating-point 2-D tensor of the safetensors file `input` with `spec` and
/// writes the quantized checkpoint to `output` atomically. Other tensors are copied.
pub fn quantize_file(input: &Path, output: &Path, spec: QuantSpec) -> Result<Vec<Report>> {
    quantize_file_filtered(input, output, spec, &TensorFilter::default())
}

/// `quantize_file` of the floating 2-D tensors `filter` selects; the others are stored as they
/// are. The same input gives the same bytes.
///
/// One tensor at a time from the memory-mapped input: each is quantized, then its pages are
/// released, so memory holds the quantized output and one tensor, not the input file.
pub fn quantize_file_filtered(
    input: &Path,
    output: &Path,
    spec: QuantSpec,
    filter: &TensorFilter,
) -> Result<Vec<Report>> {
    let map = map_file(input)?;
    // A quantized input is refused before its tensors (or its digest) are read.
    if let Ok((_, m)) = SafeTensors::read_metadata(&map) {
        ensure!(
            !m.metadata()
                .as_ref()
                .is_some_and(|m| m.contains_key(QUANTIZED_KEY)),
            "{} is already quantized by lowbit",
            input.display()
        );
    }
    let (st, meta) = parse(&map, input)?;
    release(&map, &map); // read once by the integrity check
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut quantized = Vec::new();
    let mut raw = Vec::new();
    let mut reports = Vec::with_capacity(names.len());
    for name in names {
        let t = st
            .tensor(&name)
            .map_err(|e| Error::format(format!("tensor {name}: {e}")))?;
        let shape = t.shape().to_vec();
        let before = t.data().len();
        let mut report = Report {
            name: name.clone(),
            shape: shape.clone(),
            dtype: dtype_name(t.dtype()),
            bits: None,
            sqnr_db: None,
            bytes_before: before,
            bytes_after: before,
        };
        let fd = if shape.len() == 2 && filter.selects(&name) {
            float_data(&t)
        } else {
            None
        };
        match fd {
            Some(fd) => {
                let (q, sqnr) = match &fd {
                    FloatData::F32(d) => quantize_one(d, &shape, spec),
                    FloatData::F64(d) => quantize_one(d, &shape, spec),
                    FloatData::F16(d) => quantize_one(d, &shape, spec),
                    FloatData::BF16(d) => quantize_one(d, &shape, spec),
                }
                .map_err(|e| Error::value(format!("tensor {name}: {e}")))?;
                log::debug!("quantized {name} {shape:?}: {sqnr:.2} dB");
                report.bits = Some(spec.bits);
                report.sqnr_db = Some(sqnr);
                report.bytes_after = q.nbytes();
                release(&map, t.data());
                quantized.push((name, q, t.dtype()));
            }
            None => raw.push((name, t)),
        }
        reports.push(report);
    }
    let quantized: Vec<_> = quantized
        .iter()
        .map(|(n, q, d)| (n.as_str(), q, *d))
        .collect();
    write_checkpoint(output, &quantized, raw, &user_metadata(&meta))?;
    Ok(reports)
}

/// Writes entries in the quantized format, atomically, with `extra` metadata beside lowbit's
/// own keys (`lowbit.format`, `lowbit.quantized` and `lowbit.sha256` are lowbit's;
/// `lowbit.ternary` is checked).
pub fn save(
    path: &Path,
    entries: &[(String, Entry)],
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let mut quantized = Vec::new();
    let mut raw = Vec::new();
    for (name, e) in entries {
        match e {
            Entry::Raw { dtype, shape, data } => {
                raw.push((name.clone(), tv(*dtype, shape.clone(), data)?))
            }
            Entry::Quantized { tensor, dtype } => quantized.push((name.as_str(), tensor, *dtype)),
        }
    }
    write_checkpoint(path, &quantized, raw, extra)
}

/// `save` of quantized tensors (name, tensor, original dtype) and tensors stored as they are.
fn write_checkpoint(
    path: &Path,
    quantized: &[(&str, &QuantizedTensor, Dtype)],
    raw: Vec<(String, TensorView<'_>)>,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    for k in [FORMAT_KEY, QUANTIZED_KEY, SHA256_KEY] {
        ensure!(
            !extra.contains_key(k),
            "metadata key {k:?} is lowbit's own and cannot be given"
        );
    }
    if let Some(list) = extra.get(TERNARY_KEY) {
        check_ternary(list, quantized)?;
    }
    let zps: Vec<Vec<u8>> = quantized
        .iter()
        .map(|(_, t, _)| t.zero_points.iter().map(|&z| z as i8 as u8).collect())
        .collect();
    let mut info = BTreeMap::new();
    let mut tensors = raw;
    for ((name, tensor, dtype), zb) in quantized.iter().zip(&zps) {
        info.insert(
            name.to_string(),
            QuantizedInfo {
                shape: tensor.shape.clone(),
                dtype: dtype_name(*dtype),
                spec: tensor.spec,
            },
        );
        tensors.push((
            format!("{name}.codes"),
            tv(Dtype::U8, vec![tensor.codes.len()], &tensor.codes)?,
        ));
        let scales = tensor
            .scales
            .as_slice()
            .expect("scales are standard layout");
        tensors.push((
            format!("{name}.scales"),
            tv(
                Dtype::F32,
                tensor.scales.shape().to_vec(),
                bytemuck::cast_slice(scales),
            )?,
        ));
        let zd = if tensor.spec.range().is_signed() {
            Dtype::I8
        } else {
            Dtype::U8
        };
        tensors.push((
            format!("{name}.zero_points"),
            tv(zd, tensor.zero_points.shape().to_vec(), zb)?,
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (n, _) in &tensors {
        ensure!(
            seen.insert(n.as_str()),
            "two tensors would be stored under the name {n:?}"
        );
    }
    let mut meta = extra.clone();
    meta.insert(FORMAT_KEY.to_string(), FORMAT.to_string());
    meta.insert(
        QUANTIZED_KEY.to_string(),
        serde_json::to_string(&info).expect("plain data serializes"),
    );
    integrity::write(path, tensors, meta)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so an
/// interrupted write leaves any previous file intact (see `write_atomic_with`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// `write_atomic` of what `write` writes into the temporary file; when it fails, the temporary
/// file is removed and `path` is left as it was.
///
/// On Linux the temporary file is unnamed (`O_TMPFILE`, on the file systems that have it: ext4,
/// XFS, Btrfs, tmpfs, ...): a writer killed while writing (even by SIGKILL) leaves nothing
/// behind, since the file gets a name (`.lowbit-XXXXXX.tmp`) only once it is complete and
/// synced, just before the rename. Elsewhere the temporary file is named from the start, and a
/// killed writer can leave it.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let ctx = |what: &str| format!("cannot {what} {}", path.display());
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix(".lowbit-").suffix(".tmp");
        b
    };
    #[cfg(target_os = "linux")]
    if let Some(mut file) = unnamed_temp(dir) {
        write(&mut file).map_err(|e| Error::io(ctx("write"), e))?;
        finish(&file, path, &ctx)?;
        // Named only now, complete: the window a kill could leave it in is two system calls.
        let tmp = builder()
            .make_in(dir, |name| link_unnamed(&file, name))
            .map_err(|e| Error::io(ctx("name the temporary file for"), e))?;
        tmp.persist(path)
            .map_err(|e| Error::io(ctx("replace"), e.error))?;
        return Ok(());
    }
    let mut tmp = builder()
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx("create a temporary file for"), e))?;
    write(tmp.as_file_mut()).map_err(|e| Error::io(ctx("write"), e))?;
    finish(tmp.as_file(), path, &ctx)?;
    tmp.persist(path)
        .map_err(|e| Error::io(ctx("replace"), e.error))?;
    Ok(())
}

/// Gives the written temporary file the mode a plain write would (a temporary file is private,
/// 0600) and syncs it.
fn finish(f: &std::fs::File, path: &Path, ctx: &dyn Fn(&str) -> String) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(new_file_mode(path)))
            .map_err(|e| Error::io(ctx("set the permissions of"), e))?;
    }
    f.sync_all().map_err(|e| Error::io(ctx("sync"), e))
}

/// An unnamed file in `dir` (`O_TMPFILE`), or `None` where the kernel or the file system has
/// none, or where `/proc/self/fd` (through which it is linked, see `link_unnamed`) is missing.
#[cfg(target_os = "linux")]
fn unnamed_temp(dir: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
        .ok()
}

/// Links the unnamed file `f` at `name` (`linkat` of its `/proc/self/fd` entry, which needs no
/// privilege, unlike `AT_EMPTY_PATH`).
#[cfg(target_os = "linux")]
fn link_unnamed(f: &std::fs::File, name: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let src = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("no NUL");
    let dst = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The mode of the file `path` replaces, or `0666` less the process's umask for a new one (read
/// from the kernel's process status: setting the umask to learn it would race other threads).
#[cfg(unix)]
fn new_file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        return m.permissions().mode() & 0o7777;
    }
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022);
    0o666 & !umask
}

/// The tensors `TERNARY_KEY` lists (a JSON list of names): each must be stored quantized as
/// ternary codes, 2-bit symmetric with one scale and every code in {-1, 0, 1}.
pub fn ternary_names(list: &str) -> Result<Vec<String>> {
    serde_json::from_str(list).map_err(|e| {
        Error::format(format!(
            "bad {TERNARY_KEY} metadata (a JSON list of names): {e}"
        ))
    })
}

/// Whether `t` holds ternary codes as `TERNARY_KEY` promises; the error names what is not.
pub fn check_ternary_tensor(name: &str, t: &QuantizedTensor) -> Result<()> {
    let s = t.spec;
    ensure!(
        s.bits == 2 && s.symmetric && s.granularity == Granularity::Tensor,
        "{name} is listed in {TERNARY_KEY} but stored as {} bits, {} granularity{}",
        s.bits,
        s.granularity.as_str(),
        if s.symmetric { "" } else { ", asymmetric" }
    );
    let ternary = match t.int_codes()? {
        Codes::I8(c) => c.iter().all(|&v| (-1..=1).contains(&v)),
        Codes::U8(_) => false,
    };
    ensure!(
        ternary,
        "{name} is listed in {TERNARY_KEY} but has codes outside {{-1, 0, 1}}"
    );
    Ok(())
}

fn check_ternary(list: &str, quantized: &[(&str, &QuantizedTensor, Dtype)]) -> Result<()> {
    for name in ternary_names(list)? {
        match quantized.iter().find(|(n, ..)| *n == name) {
            Some((_, tensor, _)) => check_ternary_tensor(&name, tensor)?,
            None => {
                return Err(Error::value(format!(
                    "{name} is listed in {TERNARY_KEY} but not stored quantized"
                )))
            }
        }
    }
    Ok(())
}

fn tv(d: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(d, shape, data).map_err(|e| Error::value(format!("cannot build tensor: {e}")))
}

/// Reads a quantized checkpoint, validating every quantized tensor against its metadata.
/// Anything inconsistent in the file is a `Format` error.
pub fn load(path: &Path) -> Result<Vec<(String, Entry)>> {
    load_bytes(&map_file(path)?, path)
}

/// `load` of a checkpoint already in memory (`path` only names it in errors).
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, Entry)>> {
    let (st, meta) = parse(bytes, path)?;
    entries(&st, &meta, path)
}

/// `load` of a file already mapped and parsed (`path` names it in errors).
pub(crate) fn entries(
    st: &SafeTensors<'_>,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<Vec<(String, Entry)>> {
    read_entries(st, meta, path).map_err(|e| match e {
        Error::Value(m) => Error::Format(m),
        e => e,
    })
}

fn read_entries(
    st: &SafeTensors<'_>,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<Vec<(String, Entry)>> {
    ensure!(
        meta.get(FORMAT_KEY).map(String::as_str) == Some(FORMAT),
        "{} is not a lowbit quantized checkpoint (metadata {FORMAT_KEY:?} is missing or unknown)",
        path.display()
    );
    let info: BTreeMap<String, QuantizedInfo> = serde_json::from_str(
        meta.get(QUANTIZED_KEY).map(String::as_str).unwrap_or("{}"),
    )
    .map_err(|e| {
        Error::format(format!(
            "{}: bad {QUANTIZED_KEY} metadata: {e}",
            path.display()
        ))
    })?;
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (name, qi) in &info {
        let get = |suffix: &str, want: &[Dtype]| -> Result<TensorView<'_>> {
            let n = format!("{name}.{suffix}");
            let t = st.tensor(&n).map_err(|_| {
                Error::format(format!("{}: tensor {n:?} is missing", path.display()))
            })?;
            ensure!(
                want.contains(&t.dtype()),
                "{}: tensor {n:?} has dtype {:?}",
                path.display(),
                t.dtype()
            );
            Ok(t)
        };
        let codes = get("codes", &[Dtype::U8])?;
        let scales = get("scales", &[Dtype::F32])?;
        let zps = get("zero_points", &[Dtype::I8, Dtype::U8])?;
        // Re-validate the spec: metadata is untrusted input.
        let s = qi.spec;
        let spec = QuantSpec::new(s.bits, s.symmetric, s.granularity, s.axis, s.group_size)
            .map_err(|e| Error::format(format!("{}: tensor {name:?}: {e}", path.display())))?;
        ensure!(
            qi.shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_some(),
            "{}: tensor {name:?} has an impossible shape",
            path.display()
        );
        let signed = zps.dtype() == Dtype::I8;
        let zero_points: Vec<i32> = zps
            .data()
            .iter()
            .map(|&b| if signed { b as i8 as i32 } else { b as i32 })
            .collect();
        let scales_v: Vec<f32> = bytemuck::pod_collect_to_vec(scales.data());
        let shape_err = |e: ndarray::ShapeError| {
            Error::format(format!("{}: tensor {name:?}: {e}", path.display()))
        };
        let tensor = QuantizedTensor {
            spec,
            shape: qi.shape.clone(),
            codes: codes.data().to_vec(),
            scales: ArrayD::from_shape_vec(IxDyn(scales.shape()), scales_v).map_err(shape_err)?,
            zero_points: ArrayD::from_shape_vec(IxDyn(zps.shape()), zero_points)
                .map_err(shape_err)?,
        };
        if spec.granularity == Granularity::Channel || spec.granularity == Granularity::Group {
            ensure!(
                !qi.shape.is_empty(),
                "{}: tensor {name:?} needs at least one dimension",
                path.display()
            );
        }
        tensor
            .validate()
            .map_err(|e| Error::format(format!("{}: tensor {name:?}: {e}", path.display())))?;
        for suffix in ["codes", "scales", "zero_points"] {
            used.insert(format!("{name}.{suffix}"));
        }
        out.push((
            name.clone(),
            Entry::Quantized {
                tensor,
                dtype: parse_dtype(&qi.dtype)?,
            },
        ));
    }
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for n in names {
        if used.contains(&n) {
            continue;
        }
        let t = st
            .tensor(&n)
            .map_err(|e| Error::format(format!("tensor {n}: {e}")))?;
        out.push((
            n,
            Entry::Raw {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data().to_vec(),
            },
        ));
    }
    Ok(out)
}

fn to_bytes(x: &ArrayD<f32>, dtype: Dtype) -> Vec<u8> {
    let it = x.iter();
    match dtype {
        Dtype::F64 => it.flat_map(|&v| (v as f64).to_le_bytes()).collect(),
        Dtype::F16 => it.flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::BF16 => it.flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        _ => it.flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// Reverses `quantize_file`: every quantized tensor is dequantized back to its original dtype.
pub fn dequantize_file(input: &Path, output: &Path) -> Result<Vec<Report>> {
    let map = map_file(input)?;
    let (st, meta) = parse(&map, input)?;
    let entries = entries(&st, &meta, input)?;
    let mut reports = Vec::new();
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, e) in entries {
        match e {
            Entry::Quantized { tensor, dtype } => {
                let x = tensor.dequantize()?;
                let data = to_bytes(&x, dtype);
                reports.push(Report {
                    name: name.clone(),
                    shape: tensor.shape.clone(),
                    dtype: dtype_name(dtype),
                    bits: Some(tensor.spec.bits),
                    sqnr_db: None,
                    bytes_before: tensor.nbytes(),
                    bytes_after: data.len(),
                });
                raw.push((name, dtype, tensor.shape, data));
            }
            Entry::Raw { dtype, shape, data } => {
                reports.push(Report {
                    name: name.clone(),
                    shape: shape.clone(),
                    dtype: dtype_name(dtype),
                    bits: None,
                    sqnr_db: None,
                    bytes_before: data.len(),
                    bytes_after: data.len(),
                });
                raw.push((name, dtype, shape, data));
            }
        }
    }
    let views = raw
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::value(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    integrity::write(output, views, user_metadata(&meta))?;
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_input(path: &Path) {
        let w: Vec<f32> = (0..64 * 96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let b: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let tensors = vec![
            (
                "w".to_string(),
                TensorView::new(Dtype::F32, vec![64, 96], bytemuck::cast_slice(&w)).unwrap(),
            ),
            (
                "b".to_string(),
                TensorView::new(Dtype::F32, vec![64], bytemuck::cast_slice(&b)).unwrap(),
            ),
            (
                "h".to_string(),
                TensorView::new(Dtype::F16, vec![96, 64], bytemuck::cast_slice(&h)).unwrap(),
            ),
        ];
        std::fs::write(path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    }

    #[test]
    fn globs_follow_fnmatch() {
        for (pat, name, want) in [
            ("w", "w", true),
            ("w", "ww", false),
            ("*", "", true),
            ("*embed*", "bert.embeddings.word_embeddings.weight", true),
            ("*.weight", "a.bias", false),
            ("encoder.layer.?.*", "encoder.layer.3.x", true),
            ("encoder.layer.?.*", "encoder.layer.10.x", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[!ab]x", "cx", true),
            ("[a-c]", "b", true),
            ("[c-a]", "b", false),
            ("[]]", "]", true),
            ("[!]]", "a", true),
            ("[a-]", "-", true),
            ("[", "[", true),
            ("a[b", "a[b", true),
            ("**a", "xa", true),
            ("*a*b*", "xaybz", true),
            ("*a*b", "xaybz", false),
        ] {
            assert_eq!(glob_match(pat, name), want, "{pat:?} {name:?}");
        }
        let f = TensorFilter {
            include: vec!["enc*".into()],
            exclude: vec!["enc.1".into()],
        };
        assert!(f.selects("enc.0") && !f.selects("enc.1") && !f.selects("dec.0"));
        assert!(TensorFilter::default().selects("anything"));
    }

    #[test]
    fn excluded_tensors_are_stored_as_they_are_and_output_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        write_input(&a);
        let spec = QuantSpec::new(4, true, Granularity::Group, 0, Some(32)).unwrap();
        let filter = TensorFilter {
            include: vec![],
            exclude: vec!["h".into()],
        };
        let (q1, q2) = (dir.path().join("q1"), dir.path().join("q2"));
        let rep = quantize_file_filtered(&a, &q1, spec, &filter).unwrap();
        quantize_file_filtered(&a, &q2, spec, &filter).unwrap();
        assert_eq!(std::fs::read(&q1).unwrap(), std::fs::read(&q2).unwrap());
        let bits: BTreeMap<_, _> = rep.iter().map(|r| (r.name.as_str(), r.bits)).collect();
        assert_eq!(bits["w"], Some(4));
        assert_eq!(bits["h"], None);
        let bytes = std::fs::read(&a).unwrap();
        let src = SafeTensors::deserialize(&bytes).unwrap();
        let loaded = load(&q1).unwrap();
        match &loaded.iter().find(|(n, _)| n == "h").unwrap().1 {
            Entry::Raw { dtype, data, .. } => {
                assert_eq!(*dtype, Dtype::F16);
                assert_eq!(data.as_slice(), src.tensor("h").unwrap().data());
            }
            Entry::Quantized { .. } => panic!("h was excluded"),
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn writes_go_through_an_unnamed_temporary() {
        // While `write` runs the folder holds only the old file: the temporary file has no name.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"old").unwrap();
        write_atomic_with(&path, |f| {
            use std::io::Write;
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["f"]);
            f.write_all(b"new")
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn quantize_then_dequantize_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (a, q, d) = (
            dir.path().join("a.safetensors"),
            dir.path().join("q.safetensors"),
            dir.path().join("d.safetensors"),
        );
        write_input(&a);
        let spec = QuantSpec::new(4, true, Granularity::Group, 0, Some(32)).unwrap();
        let rep = quantize_file(&a, &q, spec).unwrap();
        assert_eq!(rep.len(), 3);
        let w = rep.iter().find(|r| r.name == "w").unwrap();
        assert_eq!(w.bytes_after, 64 * 96 / 2 + 64 * 3 * 4 + 64 * 3);
        assert!(w.sqnr_db.unwrap() > 15.0);
        assert_eq!(rep.iter().find(|r| r.name == "b").unwrap().bits, None);
        let loaded = load(&q).unwrap();
        assert_eq!(loaded.len(), 3);
        dequantize_file(&q, &d).unwrap();
        let bytes = std::fs::read(&d).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("h").unwrap().dtype(), Dtype::F16);
        assert_eq!(
            st.tensor("b").unwrap().data(),
            bytemuck::cast_slice::<f32, u8>(&(0..64).map(|i| i as f32).collect::<Vec<_>>())
        );
        // a quantized file is refused as input, and a corrupt one gives an error, not a panic
        assert!(quantize_file(&q, &d, spec).is_err());
        let mut bad = std::fs::read(&q).unwrap();
        bad.truncate(bad.len() - 10);
        std::fs::write(&d, &bad).unwrap();
        assert!(load(&d).is_err());
    }
}
