//! `DeviceProfile` JSON. A profile that parses survives a JSON round trip (as `to_json` writes
//! it), and costs a small graph at every precision without NaN.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::nas::cost::estimate;
use lowbit::nas::device::{DeviceProfile, PRECISIONS};
use lowbit::nas::graph::{from_layers, Graph};
use serde_json::json;
use std::sync::OnceLock;

fn graph() -> &'static Graph {
    static G: OnceLock<Graph> = OnceLock::new();
    G.get_or_init(|| {
        let layers = json!([
            {"op": "conv2d", "out_channels": 8, "kernel": 3, "stride": 2},
            {"op": "relu"},
            {"op": "conv2d", "out_channels": 8, "kernel": 3, "groups": 8},
            {"op": "global_avgpool"},
            {"op": "flatten"},
            {"op": "linear", "out_features": 10},
            {"op": "softmax"}
        ]);
        from_layers(
            &[("x".into(), vec![1, 3, 16, 16])],
            layers.as_array().unwrap(),
        )
        .unwrap()
    })
}

/// Equal up to float parsing (serde_json may read a printed f64 back one ulp off).
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = DeviceProfile::from_json(text) else {
        return;
    };
    let back = DeviceProfile::from_json(&d.to_json()).expect("a written profile reads back");
    assert_eq!((&back.name, &back.sources), (&d.name, &d.sources));
    for (a, b) in [
        (&back.peak_gops, &d.peak_gops),
        (&back.efficiency, &d.efficiency),
        (&back.kind_overhead_us, &d.kind_overhead_us),
    ] {
        assert!(a.keys().eq(b.keys()));
        assert!(a.values().zip(b.values()).all(|(x, y)| close(*x, *y)));
    }
    for p in PRECISIONS {
        assert!(d.peak(p) > 0.0);
    }
    for (wb, ab) in [(32, 32), (16, 16), (8, 8), (4, 8), (4, 4), (2, 8), (1, 1)] {
        let c = estimate(graph(), &d, wb, ab).expect("a valid profile costs a valid graph");
        assert!(!c.latency_ms.is_nan() && !c.energy_mj.is_nan(), "{c:?}");
    }
});
