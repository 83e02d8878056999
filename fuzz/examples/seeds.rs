//! Writes small valid inputs for every fuzz target into `<dir>/<target>/seed-*`, made by lowbit
//! itself so that they follow the formats exactly as lowbit writes them (`fuzz/run.sh` runs it).
use lowbit::calib::{Histogram, MinMax, Observer, ObserverConfig, PerChannelMinMax};
use lowbit::nas::device::builtin;
use lowbit::nas::graph::from_layers;
use lowbit::quant::checkpoint::{self, Entry, QuantizedInfo, TERNARY_KEY};
use lowbit::quant::integrity::SHA256_KEY;
use lowbit::quant::spec::{quantize, Granularity, QuantSpec};
use lowbit::runtime::bert::BertConfig;
use lowbit::runtime::multitask::{MultiTaskConfig, CONFIG_KEY};
use lowbit_fuzz::{join_bert, scratch_file, Inputs};
use ndarray::{arr1, ArrayD, IxDyn};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const MULTITASK: &str = r#"{"image_size": 8, "patch_size": 4, "channels": 1, "width": 4,
"depth": 1, "heads": 2, "mlp_ratio": 1, "decoder_depth": 1, "vqa_depth": 1, "vocab_size": 6,
"max_caption_len": 3, "max_question_len": 3, "max_text_len": 3, "charset": "AB", "ocr_steps": 2,
"answers": ["yes", "no"], "embed_dim": 2, "layer_norm_eps": 1e-6, "pad_id": 0, "bos_id": 1,
"eos_id": 2, "cls_id": 3, "text": {"vocab_size": 6, "hidden_size": 4, "num_hidden_layers": 1,
"num_attention_heads": 2, "intermediate_size": 4, "max_position_embeddings": 3,
"type_vocab_size": 1}}"#;

const BERT: &str = r#"{"vocab_size": 5, "hidden_size": 4, "num_hidden_layers": 1,
"num_attention_heads": 2, "intermediate_size": 4, "max_position_embeddings": 4,
"type_vocab_size": 2, "hidden_act": "gelu"}"#;

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % 1013) as f32 / 1013.0 - 0.5)
        .collect()
}

fn raw_f32(shape: &[usize], v: &[f32]) -> Entry {
    Entry::Raw {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn quantized(shape: &[usize], v: Vec<f32>, spec: QuantSpec) -> Entry {
    let x = ArrayD::from_shape_vec(IxDyn(shape), v).unwrap();
    Entry::Quantized {
        tensor: quantize(x.view(), spec, None).unwrap(),
        dtype: Dtype::F32,
    }
}

/// Ternary codes: 2-bit symmetric per-tensor, scale 0.5, values in {-1, 0, 1} x 0.5.
fn ternary(shape: &[usize], salt: usize) -> Entry {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| ((i + salt) % 3) as f32 * 0.5 - 0.5)
        .collect();
    let x = ArrayD::from_shape_vec(IxDyn(shape), v).unwrap();
    let spec = QuantSpec::new(2, true, Granularity::Tensor, 0, None).unwrap();
    let q = (
        ArrayD::from_elem(IxDyn(&[]), 0.5f32),
        ArrayD::from_elem(IxDyn(&[]), 0),
    );
    Entry::Quantized {
        tensor: quantize(x.view(), spec, Some(q)).unwrap(),
        dtype: Dtype::F32,
    }
}

/// A checkpoint as `checkpoint::save` writes it.
fn saved(entries: &[(String, Entry)], extra: &[(&str, String)]) -> Vec<u8> {
    let path = scratch_file("seed.safetensors");
    let extra = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    checkpoint::save(&path, entries, &extra).unwrap();
    std::fs::read(path).unwrap()
}

/// The same file without its `SHA256_KEY` (files without one load unchecked), so that the
/// fuzzer's mutations reach the parsing behind the checksum instead of failing it.
fn unsealed(file: &[u8]) -> Vec<u8> {
    let st = SafeTensors::deserialize(file).unwrap();
    let (_, meta) = SafeTensors::read_metadata(file).unwrap();
    let mut meta = meta.metadata().clone().unwrap_or_default();
    meta.remove(SHA256_KEY);
    safetensors::serialize(st.tensors(), Some(meta)).unwrap()
}

/// A plain safetensors file of float32 tensors.
fn plain(tensors: &[(String, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&bytes).map(|((n, s, _), b)| {
        (
            n.clone(),
            TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    let meta = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn spec(bits: u32, symmetric: bool, g: Granularity, group: Option<usize>) -> QuantSpec {
    QuantSpec::new(bits, symmetric, g, 0, group).unwrap()
}

fn checkpoints() -> Vec<Vec<u8>> {
    let specs = [
        spec(8, true, Granularity::Tensor, None),
        spec(4, false, Granularity::Channel, None),
        spec(3, true, Granularity::Group, Some(4)),
        spec(2, false, Granularity::Group, Some(3)),
    ];
    let mut out: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let entries = vec![
                ("w".to_string(), quantized(&[3, 10], values(30, i), s)),
                ("b".to_string(), raw_f32(&[3], &values(3, i + 9))),
            ];
            saved(&entries, &[])
        })
        .collect();
    let entries = vec![
        ("t".to_string(), ternary(&[4, 5], 1)),
        ("b".to_string(), raw_f32(&[4], &values(4, 2))),
    ];
    let sealed = saved(&entries, &[(TERNARY_KEY, r#"["t"]"#.to_string())]);
    out.push(sealed.clone());
    let mut out: Vec<Vec<u8>> = out.iter().map(|f| unsealed(f)).collect();
    out.push(sealed);
    out.push(plain(&[("w".into(), vec![2, 3], values(6, 3))], &[]));
    out
}

/// Weights for every tensor `expected` lists (norm weights 1, biases and norm biases 0).
fn model_tensors(expected: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    expected
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let norm = name.contains("norm") || name.contains("LayerNorm");
            let v = if norm && name.ends_with("weight") {
                vec![1.0; n]
            } else if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                values(n, i)
            };
            (name, shape, v)
        })
        .collect()
}

fn models() -> Vec<Vec<u8>> {
    let mt = MultiTaskConfig::from_json(MULTITASK).unwrap();
    let tensors = model_tensors(mt.expected());
    let mut out = vec![[&[0u8][..], &plain(&tensors, &[(CONFIG_KEY, MULTITASK)])].concat()];
    // The same model as a quantized file: matrices at 4 bits per channel, one ternary.
    let s = spec(4, true, Granularity::Channel, None);
    let mut ternary_name = None;
    let entries: Vec<(String, Entry)> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let e = if shape.len() != 2 {
                raw_f32(shape, v)
            } else if ternary_name.is_none() && n.contains(".mlp.") {
                ternary_name = Some(n.clone());
                ternary(shape, 0)
            } else {
                quantized(shape, v.clone(), s)
            };
            (n.clone(), e)
        })
        .collect();
    let list = json!([ternary_name.unwrap()]).to_string();
    let file = saved(
        &entries,
        &[(CONFIG_KEY, MULTITASK.into()), (TERNARY_KEY, list)],
    );
    out.push([&[0u8][..], &unsealed(&file)].concat());
    let bert = BertConfig::from_json(BERT).unwrap();
    let file = plain(&model_tensors(bert.expected("bert.")), &[]);
    out.push([&[1u8][..], &join_bert(BERT.as_bytes(), &file)].concat());
    out
}

fn specs() -> Vec<Vec<u8>> {
    let mut info = BTreeMap::new();
    for (i, (s, shape)) in [
        (spec(8, false, Granularity::Tensor, None), vec![4, 4]),
        (spec(4, true, Granularity::Channel, None), vec![3, 5]),
        (spec(2, true, Granularity::Group, Some(4)), vec![2, 9]),
        (
            QuantSpec::new(5, false, Granularity::Channel, -1, None).unwrap(),
            vec![2, 3, 4],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        info.insert(
            format!("t{i}"),
            QuantizedInfo {
                shape,
                dtype: "F32".into(),
                spec: s,
            },
        );
    }
    let mut out = vec![serde_json::to_vec(&info).unwrap()];
    out.extend(
        info.values()
            .map(|qi| serde_json::to_vec(&qi.spec).unwrap()),
    );
    out.extend(["group", "entropy", "ternary", "caption"].map(|s| s.as_bytes().to_vec()));
    out
}

fn graphs() -> Vec<Vec<u8>> {
    let nets: Vec<(Inputs, Value)> = vec![
        (
            vec![("x".into(), vec![1, 3, 16, 16])],
            json!([
                {"op": "conv2d", "name": "c1", "out_channels": 8, "kernel": 3, "stride": 2},
                {"op": "batchnorm"},
                {"op": "relu6"},
                {"op": "conv2d", "out_channels": 8, "kernel": 3, "groups": 8, "bias": false},
                {"op": "maxpool", "kernel": 2},
                {"op": "global_avgpool"},
                {"op": "flatten"},
                {"op": "linear", "name": "fc", "out_features": 10},
                {"op": "softmax"}
            ]),
        ),
        (
            vec![("ids".into(), vec![1, 6]), ("q".into(), vec![1, 2, 6, 4])],
            json!([
                {"op": "embedding", "name": "emb", "inputs": ["ids"], "num_embeddings": 50, "dim": 8},
                {"op": "layernorm"},
                {"op": "attention", "name": "att", "inputs": ["q", "q", "q"]},
                {"op": "reshape", "shape": [1, 6, 8]},
                {"op": "add", "inputs": ["emb", "reshape3"]},
                {"op": "gelu"},
                {"op": "concat", "inputs": ["emb", "add4"], "axis": 2},
                {"op": "linear", "out_features": 4}
            ]),
        ),
    ];
    let mut out = Vec::new();
    for (inputs, layers) in nets {
        let as_layers = json!({
            "inputs": inputs.iter().cloned().collect::<BTreeMap<_, _>>(),
            "layers": layers,
        });
        out.push(serde_json::to_vec(&as_layers).unwrap());
        if let Ok(g) = from_layers(&inputs, layers.as_array().unwrap()) {
            out.push(g.to_json().into_bytes());
        }
    }
    out
}

fn observers() -> Vec<Vec<u8>> {
    let x = arr1(&[-1.5f32, -0.25, 0.0, 0.125, 3.0]).into_dyn();
    let mut h = Histogram::new(16).unwrap();
    let empty = serde_json::to_vec(&h).unwrap();
    h.update(&x.view()).unwrap();
    let mut mm = MinMax::default();
    mm.update(&x.view()).unwrap();
    let mut pc = PerChannelMinMax::new(0);
    pc.update(&x.view()).unwrap();
    let mut seeds = vec![
        empty,
        serde_json::to_vec(&h).unwrap(),
        serde_json::to_vec(&mm).unwrap(),
        serde_json::to_vec(&pc).unwrap(),
    ];
    // Whole observer states (settings + data), one per kind, empty and after a batch.
    let x2 = ndarray::arr2(&[[-1.5f32, 0.0, 3.0], [0.5, 0.75, 1.0]]).into_dyn();
    for kind in [
        "minmax",
        "moving_average",
        "per_channel",
        "histogram",
        "per_channel_histogram",
    ] {
        let config = ObserverConfig {
            bits: 4,
            symmetric: kind.starts_with("per"),
            method: "mse".into(),
            percentile: 99.99,
        };
        let mut o = Observer::new(kind, config, 0.01, 0, 32).unwrap();
        seeds.push(o.to_json().into_bytes());
        o.update(x2.view()).unwrap();
        seeds.push(o.to_json().into_bytes());
    }
    seeds
}

/// GGUF v3 files with one tensor of every type lowbit decodes, a Q4_K one and metadata of
/// every value type (lowbit writes GGUF through gguf-py's writer; this is the same layout).
fn gguf_files() -> Vec<Vec<u8>> {
    use lowbit::gguf::{quantize, GgmlType};
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    let x: Vec<f32> = (0..512)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02)
        .collect();
    let mut tensors: Vec<(String, u32, Vec<u8>)> =
        ["F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ1_0", "TQ2_0"]
            .iter()
            .map(|n| {
                let t = GgmlType::from_name(n).unwrap();
                (n.to_string(), t.id, quantize(&x, t, "seed").unwrap())
            })
            .collect();
    tensors.push(("Q4_K".into(), 12, vec![0; 288]));
    let mut seeds = Vec::new();
    for n in [0, 1, tensors.len()] {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((n as u64).to_le_bytes());
        b.extend(4u64.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "general.alignment");
        b.extend(4u32.to_le_bytes());
        b.extend(32u32.to_le_bytes());
        s(&mut b, "ints");
        b.extend(9u32.to_le_bytes());
        b.extend(5u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(7i32.to_le_bytes());
        b.extend((-7i32).to_le_bytes());
        s(&mut b, "f");
        b.extend(12u32.to_le_bytes());
        b.extend(0.5f64.to_le_bytes());
        let mut off = 0u64;
        for (name, id, data) in &tensors[..n] {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(2u64.to_le_bytes());
            b.extend(id.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (data.len() as u64).next_multiple_of(32);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        for (_, _, data) in &tensors[..n] {
            b.extend(data);
            b.resize(b.len().next_multiple_of(32), 0);
        }
        seeds.push(b);
    }
    seeds
}

fn write(dir: &Path, target: &str, seeds: Vec<Vec<u8>>) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(d.join(format!("seed-{i}")), s).unwrap();
    }
    println!("{target}: {} seeds", seeds.len());
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    write(dir, "checkpoint", checkpoints());
    write(dir, "model", models());
    write(dir, "spec", specs());
    let devices = builtin();
    let mut profiles: Vec<Vec<u8>> = devices.iter().map(|d| d.to_json().into_bytes()).collect();
    profiles.push(devices[0].to_json_with_sha256().into_bytes());
    write(dir, "device", profiles);
    write(dir, "graph", graphs());
    write(dir, "observer", observers());
    write(dir, "gguf", gguf_files());
    // `unpack` takes structured input (`arbitrary`): libFuzzer starts it from nothing.
    write(dir, "unpack", vec![]);
}
