//! GGUF parsing (`lowbit::gguf::parse`) and decoding: header, metadata of every type, tensor
//! infos and the block data of every tensor. A file that parses has each tensor inside it; each
//! tensor lowbit decodes comes back with its shape, as a valid QuantizedTensor whose values equal
//! the raw decode (bit for bit when it says so, else up to the sign of zero), or as that decode.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::gguf::{self, Loaded};
use lowbit::Error;

fuzz_target!(|data: &[u8]| {
    let g = match gguf::parse(data) {
        Ok(g) => g,
        Err(Error::Format(_)) => return,
        Err(e) => panic!("parse failed with a non-format error: {e}"),
    };
    for t in &g.tensors {
        assert!(t.start >= g.data_start && t.start + t.nbytes <= data.len());
        let loaded = match gguf::to_lowbit(&g, t) {
            Ok(l) => l,
            Err(Error::Format(_)) => continue, // a type lowbit does not decode
            Err(e) => panic!("{}: a non-format error: {e}", t.name),
        };
        let values = loaded.values().expect("a loaded tensor dequantizes");
        assert_eq!(values.shape(), t.shape().as_slice(), "{}", t.name);
        let raw = gguf::dequantize(g.data(t), t.ty).expect("a decoded type decodes");
        let same = |exact: bool| {
            values.iter().zip(&raw).all(|(a, b)| {
                a.to_bits() == b.to_bits() || (!exact && a == b) || (a.is_nan() && b.is_nan())
            })
        };
        match &loaded {
            Loaded::Quantized { tensor, exact } => {
                tensor
                    .validate()
                    .expect("a loaded QuantizedTensor is valid");
                assert!(
                    same(*exact),
                    "{}: values differ from the raw decode",
                    t.name
                );
            }
            Loaded::Float(_) => {
                assert!(same(true), "{}: values differ from the raw decode", t.name)
            }
        }
    }
});
