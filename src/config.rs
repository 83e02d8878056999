//! What this build found on this machine and chose: the CPU's instruction sets, the kernel path
//! of each area, threads, allocator. `lowbit.show_config()` prints it; benchmarks print it first,
//! since a figure means little without the CPU it came from.

/// Instruction sets the CPU reports, by name, each with whether it is present.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! x86 {
            ($($f:tt),*) => { vec![$(($f, std::arch::is_x86_feature_detected!($f))),*] };
        }
        x86!(
            "sse4.1",
            "avx2",
            "fma",
            "f16c",
            "popcnt",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512vnni",
            "avx512vpopcntdq",
            "avx512bf16",
            "avxvnni"
        )
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! arm {
            ($($f:tt),*) => { vec![$(($f, std::arch::is_aarch64_feature_detected!($f))),*] };
        }
        arm!("neon", "dotprod", "i8mm", "sve", "bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        vec![]
    }
}

/// The path each area's kernels take (after the `LOWBIT_ISA` cap).
pub fn kernel_paths() -> Vec<(&'static str, &'static str)> {
    let vector = if cfg!(target_arch = "x86_64") {
        match crate::quant::simd::simd_level() {
            3 => "avx512 (f/bw/vl/dq)",
            2 => "avx2+fma",
            1 => "sse4.1",
            _ => "scalar",
        }
    } else if cfg!(target_arch = "aarch64") {
        "neon (portable code vectorized by the compiler)"
    } else {
        "scalar"
    };
    vec![
        ("quant (fake-quant, quantize, observers)", vector),
        (
            "bitnet (ternary / binary GEMM)",
            crate::bitnet::kernel_name(),
        ),
        (
            "intgemm (W8A8 / W4A8 GEMM)",
            crate::bitnet::intgemm::Path::best().name(),
        ),
        ("runtime (GEMM epilogues, attention, norms)", vector),
    ]
}

/// `lowbit.show_config()`'s facts as (section, key, value) rows: version, build, CPU features,
/// kernel paths, threads and the environment variables that choose them.
pub fn rows() -> Vec<(String, String, String)> {
    let mut rows = vec![];
    let mut add = |s: &str, k: &str, v: String| rows.push((s.into(), k.into(), v));
    add("lowbit", "version", env!("CARGO_PKG_VERSION").into());
    add(
        "build",
        "target",
        format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
    );
    add(
        "build",
        "profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "optimized"
        }
        .into(),
    );
    for (f, on) in crate::config::cpu_features() {
        add("cpu", f, if on { "yes" } else { "no" }.into());
    }
    add("isa", "detected", crate::isa::detected().name().into());
    add(
        "isa",
        "cap (LOWBIT_ISA)",
        crate::isa::cap().map_or("(none)", |l| l.name()).into(),
    );
    add("isa", "in use", crate::isa::level().name().into());
    for (area, path) in crate::config::kernel_paths() {
        add("kernels", area, path.into());
    }
    add(
        "threads",
        "rayon threads",
        crate::pool::threads().to_string(),
    );
    for var in ["LOWBIT_ISA", "RAYON_NUM_THREADS"] {
        add(
            "environment",
            var,
            std::env::var(var).unwrap_or_else(|_| "(unset)".into()),
        );
    }
    rows
}
