//! `QuantSpec` parsing: the per-tensor JSON of a checkpoint's `lowbit.quantized` metadata
//! (re-validated as the loader does) and the small enums parsed from strings. A valid spec
//! survives a JSON round trip, and quantizes and dequantizes a small tensor of the stated shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::calib::Method;
use lowbit::quant::checkpoint::QuantizedInfo;
use lowbit::quant::spec::{quantize, Granularity, QuantSpec};
use lowbit::runtime::layers::WeightMode;
use lowbit::runtime::multitask::Task;
use ndarray::{ArrayD, Dimension, IxDyn};
use std::collections::BTreeMap;

/// Largest tensor quantized per input, so that each run stays fast.
const MAX_NUMEL: usize = 1 << 12;

fn exercise(s: QuantSpec, shape: &[usize]) {
    let Ok(spec) = QuantSpec::new(s.bits, s.symmetric, s.granularity, s.axis, s.group_size) else {
        return;
    };
    let json = serde_json::to_string(&spec).expect("a spec serializes");
    let back: QuantSpec = serde_json::from_str(&json).expect("a spec parses back");
    assert_eq!(back, spec);
    assert_eq!(
        spec.granularity.as_str().parse::<Granularity>().unwrap(),
        spec.granularity
    );
    let r = spec.range();
    assert!(r.min < r.max);
    let Ok(qshape) = spec.qparams_shape(shape) else {
        return;
    };
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel.is_none_or(|n| n > MAX_NUMEL) {
        return;
    }
    let x = ArrayD::from_shape_fn(IxDyn(shape), |i| {
        let k = i.slice().iter().fold(7usize, |a, &d| a * 31 + d);
        (k % 97) as f32 / 8.0 - 6.0
    });
    let q = quantize(x.view(), spec, None).expect("a finite tensor quantizes");
    assert_eq!(q.scales.shape(), qshape.as_slice());
    q.validate().expect("quantize gives a valid tensor");
    let d = q.dequantize().expect("a valid tensor dequantizes");
    assert_eq!(d.shape(), shape);
    assert!(d.iter().all(|v| v.is_finite()));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<Granularity>();
    let _ = text.parse::<Method>();
    let _ = text.parse::<WeightMode>();
    let _ = text.parse::<Task>();
    if let Ok(spec) = serde_json::from_str::<QuantSpec>(text) {
        exercise(spec, &[3, 5]);
    }
    if let Ok(info) = serde_json::from_str::<BTreeMap<String, QuantizedInfo>>(text) {
        for qi in info.values() {
            exercise(qi.spec, &qi.shape);
        }
    }
});
