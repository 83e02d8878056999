//! Graph JSON: `Graph::from_json`, and `{"inputs": {name: shape}, "layers": [...]}` through
//! `from_layers` (what `lowbit.nas.Graph.from_layers` receives). A graph that parses survives a
//! JSON round trip unchanged, and its counts and costs are computed without overflow or NaN.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::nas::cost::{estimate, peak_activation_bytes};
use lowbit::nas::device::builtin;
use lowbit::nas::graph::{from_layers, Graph};
use lowbit_fuzz::Inputs;
use serde_json::Value;

fn check(g: &Graph) {
    let json = g.to_json();
    let back = Graph::from_json(&json).expect("a written graph reads back");
    assert_eq!(back.to_json(), json);
    let (flops, params) = (g.flops(), g.params());
    let d = &builtin()[0];
    for (wb, ab) in [(32, 32), (8, 8), (4, 8), (2, 2), (1, 1)] {
        peak_activation_bytes(g, ab);
        let c = estimate(g, d, wb, ab).expect("a valid graph costs");
        assert_eq!((c.flops, c.params), (flops, params));
        assert!(!c.latency_ms.is_nan() && !c.energy_mj.is_nan(), "{c:?}");
    }
}

/// `{"inputs": {name: shape}, "layers": [...]}` as `from_layers` takes it.
fn layers(v: &Value) -> Option<(Inputs, &Vec<Value>)> {
    let inputs = v.get("inputs")?.as_object()?;
    let inputs = inputs
        .iter()
        .map(|(k, s)| {
            let s = s
                .as_array()?
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()?;
            Some((k.clone(), s))
        })
        .collect::<Option<_>>()?;
    Some((inputs, v.get("layers")?.as_array()?))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(g) = Graph::from_json(text) {
        check(&g);
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if let Some((inputs, l)) = layers(&v) {
        if let Ok(g) = from_layers(&inputs, l) {
            check(&g);
        }
    }
});
