//! Quantized-checkpoint loading: the safetensors header, lowbit's metadata (`lowbit.format`,
//! the `lowbit.quantized` JSON, the `lowbit.ternary` list) and every quantized tensor.
//! A checkpoint that loads unpacks to codes in range, dequantizes to its shape, and re-saves
//! and re-loads to the same entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::quant::affine::Codes;
use lowbit::quant::checkpoint::{self, Entry, TERNARY_KEY};
use lowbit_fuzz::{same_entries, scratch_file, NAME};
use std::collections::BTreeMap;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let loaded = checkpoint::load_bytes(data, Path::new(NAME));
    // `checkpoint::metadata` reads only the header; a file that loads has one.
    let meta = match safetensors::SafeTensors::read_metadata(data) {
        Ok((_, m)) => m.metadata().clone().unwrap_or_default(),
        Err(_) => {
            assert!(loaded.is_err(), "a file without a header loaded");
            return;
        }
    };
    let ternary = meta.get(TERNARY_KEY);
    if let Some(list) = ternary {
        let _ = checkpoint::ternary_names(list);
    }
    let Ok(entries) = loaded else { return };
    for (name, e) in &entries {
        if let Entry::Quantized { tensor, .. } = e {
            let r = tensor.spec.range();
            let in_range = match tensor.int_codes().expect("a loaded tensor unpacks") {
                Codes::I8(c) => c.iter().all(|&v| (r.min..=r.max).contains(&(v as i32))),
                Codes::U8(c) => c.iter().all(|&v| (r.min..=r.max).contains(&(v as i32))),
            };
            assert!(in_range, "{name}: codes outside [{}, {}]", r.min, r.max);
            let x = tensor.dequantize().expect("a loaded tensor dequantizes");
            assert_eq!(x.shape(), tensor.shape.as_slice());
            let _ = checkpoint::check_ternary_tensor(name, tensor);
        }
    }
    // Save with the file's ternary list (refused when it does not hold), else without.
    let path = scratch_file("checkpoint.safetensors");
    let mut extra = BTreeMap::new();
    if let Some(list) = ternary {
        extra.insert(TERNARY_KEY.to_string(), list.clone());
        if checkpoint::save(&path, &entries, &extra).is_err() {
            extra.clear();
        }
    }
    if extra.is_empty() {
        checkpoint::save(&path, &entries, &extra).expect("loaded entries save");
    }
    let again = checkpoint::load(&path).expect("a saved checkpoint loads");
    assert!(
        same_entries(&entries, &again),
        "save + load changed the checkpoint"
    );
});
