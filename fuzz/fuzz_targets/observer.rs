//! Observer state JSON (what `Observer.from_json` and `load_state_dict` read): histograms,
//! min-max and per-channel min-max. A histogram state that validates gives finite qparams by
//! every search method, merges with itself into a valid state, and takes more data. A whole
//! observer state (settings + data, `calib::Observer::from_json`) that loads gives qparams or a
//! clear error, merges with itself, takes a batch and writes back the same JSON it read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lowbit::calib::{
    search::search, Histogram, Method, MinMax, Observer, PerChannelMinMax, QParams,
};
use lowbit::quant::QRange;
use ndarray::arr1;

fn ranges() -> impl Iterator<Item = (QRange, bool)> {
    [(2, true), (4, false), (8, true), (8, false)]
        .into_iter()
        .map(|(b, s)| (QRange::for_bits(b, s).unwrap(), s))
}

fn check_qparams(r: QRange, (scale, zp): (f32, i32)) {
    assert!(scale.is_finite() && scale > 0.0, "scale {scale}");
    assert!((r.min..=r.max).contains(&zp), "zero point {zp}");
}

/// A loaded state may hold a range wider than float32's (max - min overflows to a scale of inf,
/// as in torch.ao); the scale is still never NaN, zero or negative.
fn check_loaded_qparams(r: QRange, (scale, zp): (f32, i32)) {
    assert!(scale > 0.0, "scale {scale}");
    assert!((r.min..=r.max).contains(&zp), "zero point {zp}");
}

/// Raw bytes as float32 data: valid but degenerate batches (one-sided, constant, a single
/// value, denormal or huge ranges) must give qparams from every method, never a panic or an
/// abort (constant data once asked percentile / entropy for 2^60 bins).
fn observe_raw(data: &[u8]) {
    let xs: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .filter(|v| v.is_finite())
        .collect();
    if xs.is_empty() {
        return;
    }
    let mut h = Histogram::new(64).unwrap();
    h.update(&arr1(&xs).into_dyn().view())
        .expect("finite data is accepted");
    h.validate().expect("an updated histogram is valid");
    for (r, sym) in ranges() {
        let (lo, hi) = (h.min as f64, h.max as f64);
        // max - min overflows float32 past ~3.4e38 before it is divided by the levels (in
        // torch.ao too, which gives scale inf): skip the check there.
        let fits = hi.max(0.0) - lo.min(0.0) < f32::MAX as f64 / 2.0;
        for m in [Method::Mse, Method::Entropy, Method::Percentile(99.9)] {
            let s = search(&h, r, sym, m).expect("data searches");
            if fits {
                check_qparams(r, (s.scale, s.zero_point));
            }
        }
    }
}

/// A whole observer state: everything `from_json` accepts behaves like a state `new` + `update`
/// made.
fn observer_state(text: &str) {
    let Ok(o) = Observer::from_json(text) else {
        return;
    };
    let back = o.to_json();
    assert_eq!(Observer::from_json(&back).expect("to_json reloads"), o);
    let r = o.range();
    match o.qparams() {
        Ok(QParams::Tensor(s, z)) => check_loaded_qparams(r, (s, z)),
        Ok(QParams::Channel(s, z)) => {
            assert_eq!(s.len(), z.len());
            s.into_iter()
                .zip(z)
                .for_each(|q| check_loaded_qparams(r, q));
        }
        Err(_) => {} // e.g. no data yet, or a range past float32: a clear error, not a panic
    }
    let _ = o.search();
    let mut m = o.clone();
    if m.merge(&o).is_err() {
        assert_eq!(m, o, "a failed merge changes nothing");
    }
    Observer::from_json(&m.to_json()).expect("a merged state reloads");
    let mut u = o.clone();
    let x = arr1(&[-1.0f32, 0.25, 2.0]).into_dyn();
    if u.update(x.view()).is_err() {
        assert_eq!(u, o, "a refused batch changes nothing");
    }
    Observer::from_json(&u.to_json()).expect("an updated state reloads");
}

fuzz_target!(|data: &[u8]| {
    observe_raw(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    observer_state(text);
    if let Ok(h) = serde_json::from_str::<Histogram>(text) {
        if h.validate().is_ok() {
            if !h.is_empty() {
                for (r, sym) in ranges() {
                    for m in [
                        Method::Mse,
                        Method::Sqnr,
                        Method::Entropy,
                        Method::Percentile(99.9),
                    ] {
                        let s = search(&h, r, sym, m).expect("a valid histogram searches");
                        check_qparams(r, (s.scale, s.zero_point));
                    }
                }
            }
            let mut m = h.clone();
            if m.merge(&h).is_ok() {
                m.validate().expect("a merged histogram is valid");
                assert_eq!(m.total, 2 * h.total);
            }
            let mut u = h.clone();
            let x = arr1(&[h.min.max(-1e30), 0.5, h.max.min(1e30)]).into_dyn();
            if u.update(&x.view()).is_ok() {
                u.validate().expect("an updated histogram is valid");
            }
        }
    }
    if let Ok(mm) = serde_json::from_str::<MinMax>(text) {
        for (r, sym) in ranges() {
            if let Ok(q) = mm.qparams(r, sym) {
                check_qparams(r, q);
            }
        }
    }
    if let Ok(pc) = serde_json::from_str::<PerChannelMinMax>(text) {
        for (r, sym) in ranges() {
            if let Ok((s, z)) = pc.qparams(r, sym) {
                s.into_iter().zip(z).for_each(|q| check_qparams(r, q));
            }
        }
    }
});
