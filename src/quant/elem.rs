//! The element types the kernels accept and the float type they compute in.
use half::{bf16, f16};
use std::ops::{Add, Mul, Sub};

/// Compute type of a kernel: f32 for f16/bf16/f32 input (as ATen does), f64 for f64 input.
pub trait Real:
    Copy + Send + Sync + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    /// Largest value that still converts to int64 without overflow (below 2^63).
    const I64_SAFE_MAX: Self;
    const INFINITY: Self;
    fn from_f32(v: f32) -> Self;
    fn from_i32(v: i32) -> Self;
    /// Round half to even (`std::nearbyint` in the default rounding mode).
    fn rne(self) -> Self;
    fn to_f32(self) -> f32;
}

impl Real for f32 {
    const I64_SAFE_MAX: f32 = 9.223_371_5e18; // 2^63 - 2^39, the f32 just below 2^63
    const INFINITY: f32 = f32::INFINITY;
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn from_i32(v: i32) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn rne(self) -> f32 {
        self.round_ties_even()
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Real for f64 {
    const I64_SAFE_MAX: f64 = 9_223_372_036_854_774_784.0; // 2^63 - 1024
    const INFINITY: f64 = f64::INFINITY;
    #[inline(always)]
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    #[inline(always)]
    fn from_i32(v: i32) -> f64 {
        v as f64
    }
    #[inline(always)]
    fn rne(self) -> f64 {
        self.round_ties_even()
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// A floating element type of an input array.
pub trait Elem: Copy + Send + Sync + 'static {
    type C: Real;
    fn load(self) -> Self::C;
    fn store(c: Self::C) -> Self;
    fn to_f32(self) -> f32;
    /// The slice itself when the elements are already float32 (no copy needed).
    #[inline(always)]
    fn as_f32s(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    type C = f32;
    #[inline(always)]
    fn as_f32s(xs: &[f32]) -> Option<&[f32]> {
        Some(xs)
    }
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(c: f32) -> f32 {
        c
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f64 {
    type C = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(c: f64) -> f64 {
        c
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Elem for f16 {
    type C = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(c: f32) -> f16 {
        f16::from_f32(c)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for bf16 {
    type C = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(c: f32) -> bf16 {
        bf16::from_f32(c)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}
