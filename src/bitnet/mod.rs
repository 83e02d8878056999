//! BitNet kernels: ternary (W1.58 A8) and binary (XNOR-popcount) matrix products with exact
//! integer results, and the quantizers that feed them.

pub mod aten_sum;
pub mod binary;
pub mod linear;
pub mod pack;
pub mod quant;
pub mod ternary;

/// Which kernel family runs: `LOWBIT_KERNEL=scalar|avx2` picks one for tests; the default is the
/// best the CPU has. (aarch64 runs the portable kernels, which LLVM vectorizes for NEON.)
pub fn use_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        let wanted = !matches!(
            std::env::var("LOWBIT_KERNEL").as_deref(),
            Ok("scalar") | Ok("neon")
        );
        #[cfg(target_arch = "x86_64")]
        let has = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        wanted && has
    })
}

/// The kernel path in use, for reports: "avx2" or "scalar".
pub fn kernel_name() -> &'static str {
    if use_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}
