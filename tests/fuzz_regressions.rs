//! Inputs the fuzz targets in `fuzz/` crashed on (`fuzz/run.sh`), each refused cleanly now.
//! Byte inputs are kept as found; structured ones (the `unpack` target) as the values decoded.
use lowbit::bitnet::pack::{unpack_rows, unpack_tq1};
use lowbit::quant::pack::unpack;
use ndarray::Array2;

/// `unpack`: no rows and a huge `k` overflowed the output shape (a panic in `unpack_rows`);
/// a huge `n` overflowed `n * bits` in `packed_len`.
#[test]
fn unpack_huge_claimed_lengths() {
    let none = Array2::<u8>::zeros((0, 3));
    assert!(unpack_rows(none.view(), 2, usize::MAX).is_err());
    let wide = Array2::<u8>::zeros((0, isize::MAX as usize / 4));
    assert!(unpack_tq1(wide.view(), wide.ncols() * 5).is_err());
    assert!(unpack(&[0; 8], 8, usize::MAX).is_err());
    assert!(unpack(&[0; 8], 3, (1 << 62) + 5).is_err());
}

/// `unpack`: a tensor whose shape multiplies past `usize` overflowed `numel` in `validate`.
#[test]
fn quantized_tensor_with_an_impossible_shape() {
    use lowbit::quant::spec::{Granularity, QuantSpec, QuantizedTensor};
    use ndarray::ArrayD;
    let spec = QuantSpec::new(4, true, Granularity::Tensor, 0, None).unwrap();
    for shape in [
        vec![1 << 40, 1 << 40],
        vec![0, 1 << 40, 1 << 40],
        vec![usize::MAX, 2],
    ] {
        let t = QuantizedTensor {
            spec,
            shape: shape.clone(),
            codes: vec![],
            scales: ArrayD::from_elem(vec![], 1.0),
            zero_points: ArrayD::from_elem(vec![], 0),
        };
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("too many elements"), "{shape:?}: {e}");
        assert!(t.dequantize().is_err());
    }
}

/// `observer`: a histogram state whose grid does not start at its `min` passed `validate`, and
/// merging it indexed past its counts.
#[test]
fn histogram_state_off_its_grid() {
    use lowbit::calib::Histogram;
    let crash = br#"{"bins":16,"counts":[1,0,1,2,0,0,0,0,0,1,0,0,0,0,0,0],"exp":-1,"start":-6,"min":-1.5,"max":3.0,"total":5}"#;
    let h: Histogram = serde_json::from_slice(crash).unwrap();
    let e = h.validate().unwrap_err().to_string();
    assert!(e.contains("invalid histogram state"), "{e}");
    // The state `update` gives for that data loads and merges; edited ones are refused:
    // counts outside [min, max], a sum that overflows, a bin count `new` refuses.
    let state = |counts: &str, total: &str, bins: &str| {
        format!(
            r#"{{"bins":{bins},"counts":[{counts}],"exp":-1,"start":-3,"min":-1.5,"max":3.0,"total":{total}}}"#
        )
    };
    let good = "1,0,1,2,0,0,0,0,0,1,0,0,0,0,0,0";
    let h: Histogram = serde_json::from_str(&state(good, "5", "16")).unwrap();
    h.validate().unwrap();
    let mut m = h.clone();
    m.merge(&h).unwrap();
    m.validate().unwrap();
    assert_eq!(m.total, 10);
    let max = u64::MAX.to_string();
    let overflow = format!("1,0,1,2,0,0,0,0,0,{max},0,0,0,0,0,0");
    for bad in [
        state("1,0,1,2,0,0,0,0,0,1,0,0,0,0,0,1", "6", "16"),
        state(&overflow, "4", "16"),
        state(good, "5", "5"),
    ] {
        let h: Histogram = serde_json::from_str(&bad).unwrap();
        assert!(h.validate().is_err(), "{bad}");
    }
}

/// Every state `update` and `merge` produce passes `validate` (it must not refuse real ones).
#[test]
fn histogram_states_from_data_validate() {
    use lowbit::calib::Histogram;
    use ndarray::ArrayD;
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5
    };
    for bins in [16, 100, 2048] {
        let mut all = Histogram::new(bins).unwrap();
        for scale in [1e-30f32, 1e-3, 1.0, 7.0, 1e6, 3e38] {
            let v: Vec<f32> = (0..50).map(|_| next() * scale + next()).collect();
            let mut h = Histogram::new(bins).unwrap();
            h.update(&ArrayD::from_shape_vec(vec![50], v).unwrap().view())
                .unwrap();
            h.validate().unwrap();
            all.merge(&h).unwrap();
            all.validate().unwrap();
        }
    }
}
