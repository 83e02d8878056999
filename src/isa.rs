//! The one place lowbit decides which instruction sets its kernels may use.
//!
//! The CPU is probed once; `LOWBIT_ISA=avx512vnni|avxvnni|avx2|sse4.1|neon|scalar` caps the
//! choice for every area at once (quantization, calibration, BitNet, the runtime), so a test
//! can run each path the machine has. An unknown value is ignored with a warning in the log.
//! Levels are ordered: a kernel written for a level runs at every level above it.

use std::sync::OnceLock;

/// An instruction-set level, lowest first. x86-64: baseline, SSE4.1, AVX2 + FMA, AVX-VNNI
/// (AVX2 with the 256-bit `vpdpbusd`, used where [`avx_vnni`] says the CPU has it), AVX-512
/// F/BW/VL/DQ + VNNI. aarch64: NEON (its baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Scalar,
    Sse41,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    Neon,
}

impl Level {
    /// The name `LOWBIT_ISA` takes and `show_config()` prints.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Sse41 => "sse4.1",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512Vnni => "avx512vnni",
            Level::Neon => "neon",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        [
            Level::Scalar,
            Level::Sse41,
            Level::Avx2,
            Level::AvxVnni,
            Level::Avx512Vnni,
            Level::Neon,
        ]
        .into_iter()
        .find(|l| l.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this level includes AVX2 + FMA (every x86 level from `Avx2` up).
    pub fn has_avx2(self) -> bool {
        matches!(self, Level::Avx2 | Level::AvxVnni | Level::Avx512Vnni)
    }
}

/// What this CPU supports, before any cap.
pub fn detected() -> Level {
    static HW: OnceLock<Level> = OnceLock::new();
    *HW.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("popcnt");
            if avx2
                && has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512dq")
                && has!("avx512vnni")
            {
                Level::Avx512Vnni
            } else if avx2 && has!("avxvnni") {
                Level::AvxVnni
            } else if avx2 {
                Level::Avx2
            } else if has!("sse4.1") {
                Level::Sse41
            } else {
                Level::Scalar
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            Level::Neon
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Level::Scalar
        }
    })
}

/// The cap `LOWBIT_ISA` sets, if it names a level.
pub fn cap() -> Option<Level> {
    static CAP: OnceLock<Option<Level>> = OnceLock::new();
    *CAP.get_or_init(|| {
        let v = std::env::var("LOWBIT_ISA").ok()?;
        let l = Level::parse(&v);
        if l.is_none() {
            log::warn!(
                "LOWBIT_ISA={v:?} names no instruction set (avx512vnni, avxvnni, avx2, sse4.1, neon, scalar): ignored"
            );
        }
        l
    })
}

/// The level every kernel uses: the CPU's, capped by `LOWBIT_ISA`. A cap from the other
/// architecture (`neon` on x86-64, an x86 level on aarch64) leaves only the portable code.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| resolve(detected(), cap()))
}

fn resolve(hw: Level, cap: Option<Level>) -> Level {
    let Some(cap) = cap else { return hw };
    let arm = |l: Level| l == Level::Neon;
    match (arm(hw), arm(cap)) {
        (false, false) => hw.min(cap),
        (true, true) => Level::Neon,
        _ => Level::Scalar,
    }
}

/// Whether the 256-bit AVX-VNNI `vpdpbusd` may be used: the level in use is `avxvnni` or above
/// and the CPU has the extension (some AVX-512 VNNI CPUs lack it: Ice Lake, Zen 4).
pub fn avx_vnni() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(level(), Level::AvxVnni | Level::Avx512Vnni)
                && std::arch::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether AVX-512 VPOPCNTDQ (`vpopcntq` on 512-bit vectors) may be used: the level in use is
/// `avx512vnni` and the CPU has the extension.
pub fn avx512_popcnt() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            level() == Level::Avx512Vnni && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_lower_but_never_raise() {
        assert_eq!(resolve(Level::Avx512Vnni, None), Level::Avx512Vnni);
        assert_eq!(resolve(Level::Avx512Vnni, Some(Level::Avx2)), Level::Avx2);
        assert_eq!(resolve(Level::Avx2, Some(Level::Avx512Vnni)), Level::Avx2);
        assert_eq!(resolve(Level::Avx2, Some(Level::Scalar)), Level::Scalar);
        assert_eq!(resolve(Level::Avx2, Some(Level::Neon)), Level::Scalar);
        assert_eq!(resolve(Level::Neon, Some(Level::Avx2)), Level::Scalar);
        assert_eq!(resolve(Level::Neon, Some(Level::Neon)), Level::Neon);
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse4.1"), Some(Level::Sse41));
        assert_eq!(Level::parse("avx9"), None);
        assert!(Level::AvxVnni.has_avx2() && !Level::Sse41.has_avx2());
    }
}
