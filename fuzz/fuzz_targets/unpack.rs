//! Unpacking packed codes: the bit stream of `quant::pack`, the row-wise layouts of
//! `bitnet::pack` (1..8 bits and base-3 `tq1`), and a `QuantizedTensor` assembled from
//! untrusted parts (what a checkpoint supplies), with arbitrary bits, shapes and lengths.
//! Unpacked codes lie in range, and repacking gives back the input (padding bits cleared).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::bitnet::pack::{pack_tq1, unpack_rows, unpack_tq1};
use lowbit::quant::affine::Codes;
use lowbit::quant::pack::{pack, packed_len, unpack};
use lowbit::quant::spec::{Granularity, QuantSpec, QuantizedTensor};
use ndarray::{ArrayD, ArrayView2, IxDyn};

#[derive(Arbitrary, Debug)]
enum Input {
    Stream {
        bits: u32,
        n: u64,
        packed: Vec<u8>,
    },
    Rows {
        bits: u32,
        k: u64,
        cols: u8,
        packed: Vec<u8>,
    },
    Tq1 {
        k: u64,
        cols: u8,
        packed: Vec<u8>,
    },
    Tensor {
        bits: u32,
        symmetric: bool,
        granularity: u8,
        axis: i64,
        group_size: Option<u64>,
        shape: Vec<u64>,
        codes: Vec<u8>,
        scales_shape: Vec<u8>,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
    },
}

/// A matrix of `cols` columns over `packed` (the rows that fit).
fn matrix(packed: &[u8], cols: u8) -> Option<ArrayView2<'_, u8>> {
    let cols = cols as usize;
    let rows = packed.len().checked_div(cols).unwrap_or(0);
    ArrayView2::from_shape((rows, cols), &packed[..rows * cols]).ok()
}

fuzz_target!(|input: Input| match input {
    Input::Stream { bits, n, packed } => {
        let Ok(codes) = unpack(&packed, bits, n as usize) else {
            return;
        };
        assert_eq!(codes.len() as u64, n);
        assert!(codes.iter().all(|&c| (c as u32) < 1 << bits));
        let again = pack(&codes, bits).expect("unpacked codes repack");
        assert_eq!(again.len(), packed_len(codes.len(), bits));
        // The same stream, but for the unused high bits of the last byte.
        let used = (codes.len() * bits as usize) % 8;
        let mask = if used == 0 { 0xff } else { (1u8 << used) - 1 };
        if let (Some((a, ra)), Some((b, rb))) = (again.split_last(), packed.split_last()) {
            assert_eq!(ra, rb);
            assert_eq!(*a, b & mask);
        }
    }
    Input::Rows {
        bits,
        k,
        cols,
        packed,
    } => {
        let Some(m) = matrix(&packed, cols) else {
            return;
        };
        let Ok(u) = unpack_rows(m, bits, k as usize) else {
            return;
        };
        assert_eq!(u.dim(), (m.nrows(), k as usize));
        assert!(u.iter().all(|&c| (c as u32) < 1 << bits));
    }
    Input::Tq1 { k, cols, packed } => {
        let Some(m) = matrix(&packed, cols) else {
            return;
        };
        let Ok(t) = unpack_tq1(m, k as usize) else {
            return;
        };
        assert_eq!(t.dim(), (m.nrows(), k as usize));
        assert!(t.iter().all(|c| (-1..=1).contains(c)));
        let p = pack_tq1(t.view()).expect("unpacked ternary codes repack");
        assert_eq!(p.dim(), m.dim());
        assert_eq!(unpack_tq1(p.view(), k as usize).unwrap(), t);
    }
    Input::Tensor {
        bits,
        symmetric,
        granularity,
        axis,
        group_size,
        shape,
        codes,
        scales_shape,
        scales,
        zero_points,
    } => {
        let g = [
            Granularity::Tensor,
            Granularity::Channel,
            Granularity::Group,
        ][granularity as usize % 3];
        let Ok(spec) = QuantSpec::new(bits, symmetric, g, axis, group_size.map(|v| v as usize))
        else {
            return;
        };
        let qshape = IxDyn(&scales_shape.iter().map(|&d| d as usize).collect::<Vec<_>>());
        let (Ok(scales), Ok(zero_points)) = (
            ArrayD::from_shape_vec(qshape.clone(), scales),
            ArrayD::from_shape_vec(qshape, zero_points),
        ) else {
            return;
        };
        let t = QuantizedTensor {
            spec,
            shape: shape.iter().map(|&d| d as usize).collect(),
            codes,
            scales,
            zero_points,
        };
        if t.validate().is_err() {
            return;
        }
        let r = spec.range();
        let in_range = match t.int_codes().expect("a valid tensor unpacks") {
            Codes::I8(c) => c.iter().all(|&v| (r.min..=r.max).contains(&(v as i32))),
            Codes::U8(c) => c.iter().all(|&v| (r.min..=r.max).contains(&(v as i32))),
        };
        assert!(in_range);
        let x = t.dequantize().expect("a valid tensor dequantizes");
        assert_eq!(x.shape(), t.shape.as_slice());
    }
});
