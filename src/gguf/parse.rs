//! A GGUF v2/v3 parser for untrusted bytes: every count, length and offset is checked against
//! what the file can hold before anything is allocated, arithmetic is overflow-checked, and any
//! inconsistency is a `Format` error that says where, never a panic.
//!
//! Layout (little-endian): `"GGUF"`, u32 version, u64 tensor count, u64 key-value count; the
//! key-value pairs (u64-length UTF-8 key, u32 value type, value); the tensor infos (name, u32
//! dimension count, u64 dimensions innermost first, u32 GGML type, u64 offset into the data
//! section); then, at the next multiple of `general.alignment` (32 by default), the data section.
use super::GgmlType;
use crate::{Error, Result};

/// The most dimensions a GGML tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";

/// An array value: elements of one type (arrays of arrays included).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF's value type names, by id (`gguf.GGUFValueType`).
const VALUE_TYPES: [&str; 13] = [
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
    "UINT64", "INT64", "FLOAT64",
];

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn type_id(&self) -> usize {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::Str(_) => 8,
            Array::Array(_) => 9,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    /// `"ARRAY[INT32]"`, `"ARRAY[ARRAY[STRING]]"` (an empty nested array shows no inner type).
    pub fn type_name(&self) -> String {
        let inner = match self {
            Array::Array(v) => v
                .first()
                .map_or_else(|| "ARRAY".to_string(), |a| a.type_name()),
            a => VALUE_TYPES[a.type_id()].to_string(),
        };
        format!("ARRAY[{inner}]")
    }
}

impl Value {
    /// The GGUF type name (`"UINT32"`, `"STRING"`, `"ARRAY[FLOAT32]"`, ...).
    pub fn type_name(&self) -> String {
        let id = match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(a) => return a.type_name(),
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        };
        VALUE_TYPES[id].to_string()
    }
}

/// A tensor's entry: `dims` innermost first, as GGUF stores them (`shape` gives NumPy's order),
/// `start` the absolute offset of its `nbytes` bytes in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub start: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    /// The NumPy shape (outermost first), as `gguf.GGUFReader` reshapes the data.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Elements (checked when parsed: the non-zero dimensions multiply to at most `isize::MAX`).
    pub fn numel(&self) -> usize {
        if self.dims.contains(&0) {
            return 0;
        }
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Debug)]
pub struct Gguf<'a> {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: usize,
    bytes: &'a [u8],
}

impl<'a> Gguf<'a> {
    /// The bytes of `t` (a tensor of this file).
    pub fn data(&self, t: &TensorInfo) -> &'a [u8] {
        &self.bytes[t.start..t.start + t.nbytes]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::format(format!("not a valid GGUF file: {}", msg.into()))
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(format!(
                "{what} at byte {} needs {n} bytes, the file has {} left (truncated?)",
                self.pos,
                self.left()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A count of items of at least `min_size` bytes each: refused when the rest of the file
    /// cannot hold that many, so that no allocation follows a count the file does not back.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = (self.left() / min_size.max(1)) as u64;
        if n > fits {
            return Err(bad(format!(
                "{what} at byte {at} is {n}, more than the {} bytes left can hold",
                self.left()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, &format!("{what} length"))?;
        let at = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| bad(format!("{what} at byte {at} is not valid UTF-8")))
    }

    fn value_type(&mut self, what: &str) -> Result<u32> {
        let at = self.pos;
        let t = self.u32(what)?;
        if t as usize >= VALUE_TYPES.len() {
            return Err(bad(format!(
                "{what} at byte {at} has unknown value type {t}"
            )));
        }
        Ok(t)
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.pos;
        match self.take(1, what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(format!("{what} at byte {at} is a bool of value {v}"))),
        }
    }

    fn value(&mut self, t: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match t {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => Value::Bool(self.bool(what)?),
            8 => Value::Str(self.string(what)?),
            9 => Value::Array(self.array(what, depth)?),
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            _ => unreachable!("value_type checked"),
        })
    }

    fn fixed<T, const N: usize>(
        &mut self,
        n: usize,
        what: &str,
        f: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let s = self.take(n * N, what)?; // n * N <= bytes left (count checked it)
        Ok(s.chunks_exact(N)
            .map(|c| f(c.try_into().expect("N bytes")))
            .collect())
    }

    fn array(&mut self, what: &str, depth: usize) -> Result<Array> {
        // Arrays of arrays nest; a bound keeps a crafted file from exhausting the stack.
        if depth >= 8 {
            return Err(bad(format!("{what} nests arrays more than 8 deep")));
        }
        let t = self.value_type(&format!("{what} element type"))?;
        let sizes = [1, 1, 2, 2, 4, 4, 4, 1, 8, 12, 8, 8, 8];
        let n = self.count(sizes[t as usize], &format!("{what} element count"))?;
        Ok(match t {
            0 => Array::U8(self.fixed(n, what, |[b]: [u8; 1]| b)?),
            1 => Array::I8(self.fixed(n, what, |[b]: [u8; 1]| b as i8)?),
            2 => Array::U16(self.fixed(n, what, u16::from_le_bytes)?),
            3 => Array::I16(self.fixed(n, what, i16::from_le_bytes)?),
            4 => Array::U32(self.fixed(n, what, u32::from_le_bytes)?),
            5 => Array::I32(self.fixed(n, what, i32::from_le_bytes)?),
            6 => Array::F32(self.fixed(n, what, f32::from_le_bytes)?),
            7 => Array::Bool((0..n).map(|_| self.bool(what)).collect::<Result<_>>()?),
            8 => Array::Str((0..n).map(|_| self.string(what)).collect::<Result<_>>()?),
            9 => Array::Array(
                (0..n)
                    .map(|_| self.array(what, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            10 => Array::U64(self.fixed(n, what, u64::from_le_bytes)?),
            11 => Array::I64(self.fixed(n, what, i64::from_le_bytes)?),
            12 => Array::F64(self.fixed(n, what, f64::from_le_bytes)?),
            _ => unreachable!("value_type checked"),
        })
    }
}

/// Parses a GGUF file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Gguf<'_>> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.take(4, "the magic")? != MAGIC {
        return Err(bad("it does not start with \"GGUF\""));
    }
    let version = r.u32("the version")?;
    if (2..=3).contains(&version.swap_bytes()) {
        return Err(bad(
            "it is a big-endian GGUF file (lowbit reads little-endian ones)",
        ));
    }
    if !(2..=3).contains(&version) {
        return Err(bad(format!(
            "version {version} (lowbit reads versions 2 and 3)"
        )));
    }
    let at = r.pos;
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.count(13, "the key-value count")?; // key length 8 + type 4 + value 1
                                                    // a tensor info is at least 24 bytes: name length 8, dimension count 4, type 4, offset 8
    if n_tensors > (r.left() / 24) as u64 {
        return Err(bad(format!(
            "the tensor count at byte {at} is {n_tensors}, more than the file can hold"
        )));
    }
    let mut metadata: Vec<(String, Value)> = Vec::new();
    for i in 0..n_kv {
        let key = r.string(&format!("the key of metadata entry {i}"))?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("the metadata key {key:?} appears twice")));
        }
        let what = format!("the value of {key:?}");
        let t = r.value_type(&what)?;
        let v = r.value(t, &what, 0)?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
        Some((_, v)) => {
            return Err(bad(format!(
                "general.alignment must be a UINT32 power of two, got {v:?}"
            )))
        }
    };
    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let at = r.pos;
        let nd = r.u32(&format!("the dimension count of tensor {name:?}"))? as usize;
        if nd > MAX_DIMS {
            return Err(bad(format!(
                "tensor {name:?} has {nd} dimensions (byte {at}; GGML has at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(nd);
        for _ in 0..nd {
            dims.push(r.u64(&format!("the dimensions of tensor {name:?}"))?);
        }
        let at = r.pos;
        let id = r.u32(&format!("the type of tensor {name:?}"))?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            bad(format!(
                "tensor {name:?} has unknown GGML type id {id} (byte {at})"
            ))
        })?;
        let offset = r.u64(&format!("the offset of tensor {name:?}"))?;
        infos.push((name, dims, ty, offset));
    }
    // A file without tensors may end before the padding of an empty data section.
    let data_start = (r.pos as u64)
        .checked_next_multiple_of(alignment)
        .map(|s| {
            if infos.is_empty() {
                s.min(bytes.len() as u64)
            } else {
                s
            }
        })
        .filter(|&s| s <= bytes.len() as u64)
        .ok_or_else(|| {
            bad(format!(
                "the data section would start past the end of the file ({} bytes)",
                bytes.len()
            ))
        })? as usize;
    let data_len = (bytes.len() - data_start) as u64;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(infos.len());
    for (name, dims, ty, offset) in infos {
        if tensors.iter().any(|t| t.name == name) {
            return Err(bad(format!("the tensor name {name:?} appears twice")));
        }
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % ty.block as u64 != 0 {
            return Err(bad(format!(
                "tensor {name:?} ({}) has rows of {ne0} elements, not a whole number of \
                 {}-element blocks",
                ty.name, ty.block
            )));
        }
        let nbytes = dims
            .iter()
            .skip(1)
            .try_fold(
                (ne0 / ty.block as u64).checked_mul(ty.size as u64),
                |a, &d| Some(a.and_then(|a| a.checked_mul(d))),
            )
            .flatten()
            .filter(|&n| n <= data_len)
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name:?} of dimensions {dims:?} ({}) needs more bytes than the \
                     file's data section holds ({data_len})",
                    ty.name
                ))
            })?;
        // Zero-length axes make nbytes 0 whatever the others claim; those must still make an array.
        let fits = dims
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n <= isize::MAX as u64);
        if !fits {
            return Err(bad(format!(
                "tensor {name:?} of dimensions {dims:?} has more elements than an array can hold"
            )));
        }
        if offset % alignment != 0 {
            return Err(bad(format!(
                "tensor {name:?} starts at data offset {offset}, not a multiple of the \
                 alignment {alignment}"
            )));
        }
        if offset.checked_add(nbytes).is_none_or(|end| end > data_len) {
            return Err(bad(format!(
                "tensor {name:?} ({nbytes} bytes at data offset {offset}) runs past the end of \
                 the file (the data section has {data_len} bytes; truncated?)"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            start: data_start + offset as usize,
            nbytes: nbytes as usize,
        });
    }
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
        bytes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small GGUF writer for tests: `kv` are (key, type id, encoded value) triples, `tensors`
    /// (name, dims, type id, data).
    pub(crate) fn file(
        kv: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, Vec<u8>)],
    ) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, t, v) in kv {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut off = 0u64;
        for (name, dims, t, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (data.len() as u64).next_multiple_of(32);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        for (_, _, _, data) in tensors {
            b.extend(data);
            b.resize(b.len().next_multiple_of(32), 0);
        }
        b
    }

    fn str_val(x: &str) -> Vec<u8> {
        let mut b = (x.len() as u64).to_le_bytes().to_vec();
        b.extend(x.as_bytes());
        b
    }

    pub(crate) fn sample() -> Vec<u8> {
        let mut arr = 5u32.to_le_bytes().to_vec(); // INT32 elements
        arr.extend(2u64.to_le_bytes());
        arr.extend(7i32.to_le_bytes());
        arr.extend((-1i32).to_le_bytes());
        let f: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        file(
            &[
                ("general.architecture", 8, str_val("llama")),
                ("n", 4, 3u32.to_le_bytes().to_vec()),
                ("flag", 7, vec![1]),
                ("list", 9, arr),
            ],
            &[("w", &[2], 0, f), ("q", &[32], 8, vec![0; 34])],
        )
    }

    #[test]
    fn a_file_without_tensors_needs_no_padding() {
        let b = file(&[("general.name", 8, str_val("x"))], &[]);
        let end = 24 + 8 + 12 + 4 + 8 + 1;
        let g = parse(&b[..end]).unwrap();
        assert!(g.tensors.is_empty() && g.data_start == end);
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let b = sample();
        let g = parse(&b).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("general.architecture"),
            Some(&Value::Str("llama".into()))
        );
        assert_eq!(g.get("n"), Some(&Value::U32(3)));
        assert_eq!(g.get("flag"), Some(&Value::Bool(true)));
        assert_eq!(g.get("list"), Some(&Value::Array(Array::I32(vec![7, -1]))));
        assert_eq!(g.get("list").unwrap().type_name(), "ARRAY[INT32]");
        assert_eq!(g.tensors.len(), 2);
        let w = &g.tensors[0];
        assert_eq!((w.ty.name, w.shape(), w.nbytes), ("F32", vec![2], 8));
        assert_eq!(g.data(w), &[0, 0, 128, 63, 0, 0, 0, 192]);
        assert_eq!(g.tensors[1].start, g.data_start + 32);
    }

    /// Every prefix of a valid file is refused with a format error, never a panic.
    #[test]
    fn truncated_files_are_format_errors() {
        let b = sample();
        let end = parse(&b).unwrap();
        let last = end.tensors[1].start + end.tensors[1].nbytes;
        for n in 0..last {
            match parse(&b[..n]) {
                Err(Error::Format(_)) => {}
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    /// Flipping any byte gives a file that parses or a format error.
    #[test]
    fn flipped_bytes_never_panic() {
        let b = sample();
        for i in 0..b.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut c = b.clone();
                c[i] ^= x;
                match parse(&c) {
                    Ok(_) | Err(Error::Format(_)) => {}
                    Err(e) => panic!("byte {i}: {e:?}"),
                }
            }
        }
    }

    fn err(b: &[u8]) -> String {
        match parse(b) {
            Err(Error::Format(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malicious_headers_are_refused_before_allocating() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("tensor count"));
        let mut b = sample();
        b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(err(&b).contains("key-value count"));
        // a string length of 2^63
        let mut b = sample();
        b[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(err(&b).contains("length"), "{}", err(&b));
        // an array claiming 2^40 elements
        let big = {
            let mut a = 0u32.to_le_bytes().to_vec();
            a.extend((1u64 << 40).to_le_bytes());
            a
        };
        assert!(err(&file(&[("a", 9, big)], &[])).contains("element count"));
        // nested arrays past the depth bound
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        assert!(err(&file(&[("a", 9, deep)], &[])).contains("deep"));
    }

    #[test]
    fn bad_tensors_name_the_tensor() {
        let e = err(&file(&[], &[("t", &[32], 77, vec![0; 34])]));
        assert!(
            e.contains("\"t\"") && e.contains("unknown GGML type id 77"),
            "{e}"
        );
        let e = err(&file(&[], &[("odd", &[33], 8, vec![0; 68])]));
        assert!(e.contains("\"odd\"") && e.contains("33 elements"), "{e}");
        let e = err(&file(&[], &[("big", &[1 << 40, 1 << 40], 0, vec![0; 4])]));
        assert!(e.contains("\"big\""), "{e}");
        let e = err(&file(&[], &[("zero", &[1 << 62, 4, 0], 2, vec![])]));
        assert!(e.contains("\"zero\"") && e.contains("more elements"), "{e}");
        let e = err(&file(&[], &[("many", &[1, 1, 1, 1, 1], 0, vec![0; 4])]));
        assert!(e.contains("5 dimensions"), "{e}");
        let e = err(&file(
            &[("general.alignment", 4, 3u32.to_le_bytes().to_vec())],
            &[],
        ));
        assert!(e.contains("alignment"), "{e}");
        let e = err(&file(&[("flag", 7, vec![2])], &[]));
        assert!(e.contains("bool"), "{e}");
        let e = err(&file(
            &[],
            &[("a", &[1], 0, vec![0; 4]), ("a", &[1], 0, vec![0; 4])],
        ));
        assert!(e.contains("twice"), "{e}");
        let mut v = file(&[], &[("t", &[1], 0, vec![0; 4])]);
        v[..4].copy_from_slice(b"GGUX");
        assert!(err(&v).contains("GGUF"));
        let mut v = file(&[], &[]);
        v[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(&v).contains("big-endian"));
    }
}
