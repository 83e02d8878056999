//! BitNet kernels: ternary (W1.58 A8) and binary (XNOR-popcount) matrix products with exact
//! integer results, and the quantizers that feed them.

pub mod aten_sum;
pub mod binary;
pub mod intgemm;
pub mod linear;
pub mod pack;
pub mod quant;
pub mod ternary;

/// Whether the AVX2 kernel family runs: the CPU has AVX2, FMA and POPCNT and `LOWBIT_ISA` does
/// not cap below `avx2` (see [`crate::isa`]). aarch64 runs the portable kernels, which LLVM
/// vectorizes for NEON.
pub fn use_avx2() -> bool {
    crate::isa::level().has_avx2()
}

/// Whether the ternary GEMM's tiles (panels and row tiles) take AVX-512 VNNI (`vpdpbusd` on
/// 512-bit vectors): the level in use is `avx512vnni`.
pub fn use_vnni() -> bool {
    crate::isa::level() == crate::isa::Level::Avx512Vnni
}

/// Whether the ternary GEMM's 256-bit tiles take AVX-VNNI's `vpdpbusd` (no AVX-512 VNNI in use,
/// and [`crate::isa::avx_vnni`]).
pub fn use_avx_vnni() -> bool {
    !use_vnni() && crate::isa::avx_vnni()
}

/// The kernel path in use, for reports: "avx2" or "scalar", with the AVX-512 extensions taken.
pub fn kernel_name() -> &'static str {
    if crate::isa::avx512_popcnt() {
        "avx2+avx512vnni+avx512vpopcntdq"
    } else if use_vnni() {
        "avx2+avx512vnni"
    } else if use_avx_vnni() {
        "avx2+avxvnni"
    } else if use_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}
