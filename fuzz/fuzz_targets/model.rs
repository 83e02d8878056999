//! Runtime model loading from bytes: `Weights` (plain and quantized safetensors, ternary codes)
//! and the two models built on them, as their `load`s do: the multi-task model with its config
//! in the file's metadata, and the BERT encoder with a `config.json` beside the weights.
//! The first byte picks the model (bit 0), the weight mode (bits 1-3) and act_bits (bit 4).
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::runtime::bert::{BertConfig, BertEncoder};
use lowbit::runtime::layers::WeightMode;
use lowbit::runtime::multitask::{MultiTaskConfig, MultiTaskModel, CONFIG_KEY};
use lowbit::runtime::weights::Weights;
use lowbit_fuzz::{split_bert, NAME};
use std::path::Path;

const MODES: [WeightMode; 5] = [
    WeightMode::F32,
    WeightMode::Int8,
    WeightMode::Int4,
    WeightMode::Ternary,
    WeightMode::Binary,
];

/// What a loaded file promises: ternary codes in {-1, 0, 1}, every tensor a float32 tensor.
fn check(w: &Weights) {
    for name in w.quantized().keys() {
        if let Some((codes, _)) = w.ternary(name) {
            assert!(codes.iter().all(|c| (-1..=1).contains(c)), "{name}");
        }
    }
    for name in w.names() {
        w.get(name).expect("a listed weight is there");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mode = MODES[(sel as usize >> 1) % 8 % MODES.len()];
    let act_bits = (sel & 0x10 != 0).then_some(8);
    let name = Path::new(NAME);
    if sel & 1 == 0 {
        // `MultiTaskModel::load`
        let Ok(w) = Weights::from_bytes(rest, name) else {
            return;
        };
        check(&w);
        let Some(json) = w.metadata().get(CONFIG_KEY) else {
            return;
        };
        let Ok(config) = MultiTaskConfig::from_json(json) else {
            return;
        };
        let _ = MultiTaskModel::from_weights(config, json.clone(), &w, mode, act_bits);
    } else {
        // `BertEncoder::load`
        let Some((config, file)) = split_bert(rest) else {
            return;
        };
        let Ok(config) = std::str::from_utf8(config) else {
            return;
        };
        let Ok(config) = BertConfig::from_json(config) else {
            return;
        };
        let Ok(w) = Weights::from_bytes(file, name) else {
            return;
        };
        check(&w);
        let prefix = if w.names().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let _ = BertEncoder::from_weights(config, &w, prefix, mode, act_bits);
    }
});
