//! Affine quantization with ATen's exact arithmetic: `q = clamp(zp + nearbyint(x * (1/scale)))`
//! in float32 with the float32 reciprocal, rounding half to even, and `x̂ = (q - zp) * scale`.
//!
//! The edge cases (NaN, ±Inf, values beyond int64) follow what PyTorch's CPU kernels return,
//! which differs between its entry points; each kernel below says which rule it follows.

mod drivers;
mod fake_quant;
mod learnable;
mod quantize;
mod ranges;

pub(crate) use drivers::{drive, Layout};
pub use fake_quant::{
    fake_quantize_per_channel, fake_quantize_per_tensor, FakeQuantOp, FakeQuantOutput,
};
pub use learnable::LearnableGrad;
pub use quantize::{
    dequantize_per_channel, dequantize_per_tensor, quantize_per_channel, quantize_per_tensor, Code,
    Codes,
};
pub(crate) use quantize::{Dequant, QuantChannel};
pub(crate) use ranges::channel_params;
pub use ranges::{check_axis, check_scale, check_zero_point, QRange};

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn bad_arguments_are_errors() {
        let x = arr1(&[1.0f32]).into_dyn();
        assert!(fake_quantize_per_tensor(x.view(), 0.0, 0, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), f64::NAN, 0, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), 1.0, 16, 0, 15, false).is_err());
        assert!(fake_quantize_per_tensor(x.view(), 1.0, 0, 5, 3, false).is_err());
        assert!(
            fake_quantize_per_channel(x.view(), &[1.0, 2.0], &[0, 0], 0, 0, 15, false).is_err()
        );
        assert!(fake_quantize_per_channel(x.view(), &[1.0], &[0], 1, 0, 15, false).is_err());
        assert!(quantize_per_tensor(x.view(), 1.0, 0, -1, 255).is_err());
        assert!(QRange::for_bits(9, true).is_err());
    }
}
