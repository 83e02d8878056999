//! GGUF, llama.cpp's file format: the GGML block codecs lowbit writes (Q8_0, Q4_0, TQ2_0, TQ1_0,
//! F16, BF16, F32), a parser for untrusted GGUF v2/v3 files, and the conversion of a parsed
//! tensor into lowbit's `QuantizedTensor` where one holds it exactly.
//!
//! The reference for every byte is the `gguf` Python package (llama.cpp's `gguf-py`):
//! `codec::quantize` equals `gguf.quants.quantize` byte for byte and `codec::dequantize` equals
//! `gguf.quants.dequantize` bit for bit (float32), which `python/tests/test_gguf.py` checks.

pub mod codec;
pub mod convert;
pub mod parse;

pub use codec::{dequantize, quantize};
pub use convert::{to_lowbit, Loaded};
pub use parse::{parse, Array, Gguf, TensorInfo, Value};

use crate::{Error, Result};

/// A GGML tensor type: its id in GGUF files, name, elements per block and bytes per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: usize,
    pub size: usize,
}

const fn t(id: u32, name: &'static str, block: usize, size: usize) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        size,
    }
}

/// Every type a GGUF file may hold (ggml's `type_traits`, as `gguf.constants.GGML_QUANT_SIZES`
/// lists them). A file with another id is refused; lowbit decodes the ones `codec` names.
pub const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 40),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }

    /// The type named `name` (`"Q4_0"`, `"F16"`, ...), or a `Value` error listing the ones
    /// lowbit writes.
    pub fn from_name(name: &str) -> Result<GgmlType> {
        TYPES
            .iter()
            .copied()
            .find(|t| t.name == name && codec::Codec::of(*t).is_some())
            .ok_or_else(|| {
                Error::value(format!(
                    "unknown GGML type {name:?}: lowbit encodes {}",
                    codec::Codec::NAMES.join(", ")
                ))
            })
    }

    /// Bytes of a row of `n` elements (None when `n` is not a whole number of blocks).
    pub fn row_bytes(&self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block) {
            return None;
        }
        (n / self.block).checked_mul(self.size)
    }
}
