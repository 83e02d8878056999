//! Device profiles: peak compute by precision, memory bandwidth, per-op-kind efficiency, per-op
//! overhead and energy, each figure with its source.
use crate::{ensure, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Precisions a profile can list a peak for, widest first. A precision a device lacks runs at
/// the next wider one it has.
/// Field of a saved profile holding the SHA-256 (lowercase hex) of its content, checked on
/// load when present (a hand-written profile needs none).
pub const SHA256_FIELD: &str = "sha256";

pub const PRECISIONS: [&str; 4] = ["f32", "f16", "int8", "int4"];

/// Efficiency keys: the op kinds plus `conv_dw` (depthwise convolution).
pub const EFFICIENCY_KEYS: [&str; 14] = [
    "conv",
    "conv_dw",
    "matmul",
    "attention",
    "norm",
    "activation",
    "pool",
    "softmax",
    "elementwise",
    "reduce",
    "embedding",
    "copy",
    "view",
    "other",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Peak arithmetic rate in G ops/s (1 MAC = 2 ops) by precision.
    pub peak_gops: BTreeMap<String, f64>,
    /// Sustained DRAM bandwidth in GB/s.
    pub bandwidth_gbs: f64,
    /// Fraction of the roofline an op kind reaches (default 1).
    #[serde(default)]
    pub efficiency: BTreeMap<String, f64>,
    /// Fixed cost per op (dispatch / kernel launch), microseconds.
    #[serde(default)]
    pub overhead_us: f64,
    /// Per-op overhead of particular op kinds (keys as in `efficiency`), overriding
    /// `overhead_us` (a convolution's dispatch costs more than an add's in most runtimes).
    #[serde(default)]
    pub kind_overhead_us: BTreeMap<String, f64>,
    /// Fixed cost per view / reshape (0 for compiled runtimes, a few µs in eager PyTorch).
    #[serde(default)]
    pub view_overhead_us: f64,
    /// Multiplies the Horowitz (45 nm) arithmetic energies, e.g. 0.25 for a 7 nm phone SoC.
    #[serde(default = "unit")]
    pub energy_scale: f64,
    /// DRAM energy per byte moved, picojoules.
    #[serde(default = "dram_pj")]
    pub dram_pj_per_byte: f64,
    /// Where each figure comes from.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

fn unit() -> f64 {
    1.0
}

/// Horowitz, "Computing's energy problem", ISSCC 2014: a 64-bit DRAM access costs 1.3-2.6 nJ;
/// the midpoint is 1.95 nJ / 8 bytes.
fn dram_pj() -> f64 {
    1950.0 / 8.0
}

impl DeviceProfile {
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.name.is_empty(), "a device profile needs a name");
        let pos = |v: f64| v.is_finite() && v > 0.0;
        ensure!(
            pos(self.bandwidth_gbs),
            "device '{}': bandwidth_gbs must be positive and finite, got {}",
            self.name,
            self.bandwidth_gbs
        );
        ensure!(
            !self.peak_gops.is_empty(),
            "device '{}': peak_gops needs at least one of {PRECISIONS:?}",
            self.name
        );
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        self.check_map(
            "peak_gops",
            &self.peak_gops,
            "precision",
            &PRECISIONS,
            pos,
            "positive",
        )?;
        self.check_map(
            "efficiency",
            &self.efficiency,
            "op kind",
            &EFFICIENCY_KEYS,
            pos,
            "positive",
        )?;
        self.check_map(
            "kind_overhead_us",
            &self.kind_overhead_us,
            "op kind",
            &EFFICIENCY_KEYS,
            nonneg,
            "finite and >= 0",
        )?;
        for (what, v) in [
            ("overhead_us", self.overhead_us),
            ("view_overhead_us", self.view_overhead_us),
            ("energy_scale", self.energy_scale),
            ("dram_pj_per_byte", self.dram_pj_per_byte),
        ] {
            ensure!(
                nonneg(v),
                "device '{}': {what} must be finite and >= 0, got {v}",
                self.name
            );
        }
        Ok(())
    }

    /// Every key of `map` is one of `known` and every value passes `ok`.
    fn check_map(
        &self,
        field: &str,
        map: &BTreeMap<String, f64>,
        noun: &str,
        known: &[&str],
        ok: impl Fn(f64) -> bool,
        need: &str,
    ) -> Result<()> {
        for (k, &v) in map {
            ensure!(
                known.contains(&k.as_str()),
                "device '{}': unknown {noun} '{k}' in {field}; known: {known:?}",
                self.name
            );
            ensure!(
                ok(v),
                "device '{}': {field}['{k}'] must be {need}, got {v}",
                self.name
            );
        }
        Ok(())
    }

    /// Parses and validates a profile; a `SHA256_FIELD`, when present, must match.
    pub fn from_json(s: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::value(format!("bad device profile JSON: {e}"));
        let mut v: serde_json::Value = serde_json::from_str(s).map_err(bad)?;
        let sum = v.as_object_mut().and_then(|o| o.remove(SHA256_FIELD));
        let d: DeviceProfile = match sum {
            // without the field, from the text itself: errors then give line and column
            None => serde_json::from_str(s).map_err(bad)?,
            Some(_) => serde_json::from_value(v).map_err(bad)?,
        };
        if let Some(sum) = sum {
            if sum.as_str() != Some(d.sha256().as_str()) {
                return Err(Error::format(format!(
                    "device profile '{}' does not match its {SHA256_FIELD:?} field: it is \
                     corrupted or was modified (delete the field after editing by hand)",
                    d.name
                )));
            }
        }
        d.validate()?;
        Ok(d)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile always serialises")
    }

    /// `to_json` with a `SHA256_FIELD`: what `DeviceProfile.save` writes.
    pub fn to_json_with_sha256(&self) -> String {
        let mut v = serde_json::to_value(self).expect("a profile always serialises");
        v.as_object_mut()
            .expect("a profile is an object")
            .insert(SHA256_FIELD.into(), self.sha256().into());
        serde_json::to_string_pretty(&v).expect("a profile always serialises")
    }

    /// SHA-256 of the compact JSON (`serde_json::to_string`: fields in declaration order,
    /// maps sorted, floats in shortest round-trip form), so it survives re-indenting.
    fn sha256(&self) -> String {
        crate::quant::integrity::sha256_hex(
            serde_json::to_string(self)
                .expect("a profile always serialises")
                .as_bytes(),
        )
    }

    /// Peak G ops/s for a precision, falling back to wider precisions the device has.
    pub fn peak(&self, precision: &str) -> f64 {
        let start = PRECISIONS.iter().position(|&p| p == precision).unwrap_or(0);
        PRECISIONS[..=start]
            .iter()
            .rev()
            .find_map(|p| self.peak_gops.get(*p).copied())
            .or_else(|| self.peak_gops.values().copied().reduce(f64::min))
            .expect("validated: at least one peak")
    }

    pub fn efficiency(&self, key: &str) -> f64 {
        self.efficiency.get(key).copied().unwrap_or(1.0)
    }

    /// Fixed cost of one op of a kind, microseconds.
    pub fn overhead(&self, key: &str) -> f64 {
        if key == "view" {
            return self.view_overhead_us;
        }
        self.kind_overhead_us
            .get(key)
            .copied()
            .unwrap_or(self.overhead_us)
    }
}

/// The precision an op computes in for given weight and activation bits: float activations run
/// in float (weights are dequantized), int activations in the narrowest integer unit that holds
/// both operands; INT2 and ternary run as packed INT4.
pub fn precision(weight_bits: u32, act_bits: u32) -> &'static str {
    if act_bits > 16 {
        "f32"
    } else if act_bits > 8 {
        "f16"
    } else if weight_bits <= 4 && act_bits <= 4 {
        "int4"
    } else {
        "int8"
    }
}

fn gops(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
    v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
}

fn texts(v: &[(&str, &str)]) -> BTreeMap<String, String> {
    v.iter()
        .map(|(k, x)| (k.to_string(), x.to_string()))
        .collect()
}

/// The built-in phone profiles (the measured `host` profile is made in Python).
pub fn builtin() -> Vec<DeviceProfile> {
    const ENERGY: &str = "Horowitz, ISSCC 2014 (45 nm): 32-bit float MAC 4.6 pJ, 16-bit float \
        1.5 pJ, 8-bit int multiply 0.2 pJ + add 0.03 pJ (multiply scaled by the product of \
        operand widths, add by width); scaled by energy_scale = (7/45)^1 ~ 0.16 for a 7 nm \
        node as a first-order assumption";
    const LPDDR4X: &str = "LPDDR4X-4266, 4 x 16-bit channels: 34.1 GB/s peak (Snapdragon 855 \
        spec); about 60% sustained, as STREAM-style copies on such phones measure";
    const LPDDR4X_PJ: &str = "LPDDR4X about 4-5 pJ/bit for a phone (JEDEC LPDDR4X vs \
        LPDDR4 power claims): 40 pJ/byte";
    vec![
        DeviceProfile {
            name: "cortex-a76".into(),
            description: "phone CPU, big cluster of a Snapdragon 855 class SoC: 1 x 2.84 GHz + \
                3 x 2.42 GHz Cortex-A76, NEON, int8 via SDOT"
                .into(),
            peak_gops: gops(&[("f32", 161.7), ("f16", 323.4), ("int8", 646.7)]),
            bandwidth_gbs: 20.5,
            efficiency: gops(&[
                ("conv", 0.55),
                ("conv_dw", 0.15),
                ("matmul", 0.6),
                ("attention", 0.35),
            ]),
            overhead_us: 4.0,
            kind_overhead_us: BTreeMap::new(),
            view_overhead_us: 0.0,
            energy_scale: 0.16,
            dram_pj_per_byte: 40.0,
            sources: texts(&[
                (
                    "peak_gops",
                    "Cortex-A76: two 128-bit NEON FMA pipes = 16 f32 flop/cycle, 32 f16 \
                     flop/cycle, 64 int8 op/cycle with SDOT (Arm Cortex-A76 software \
                     optimization guide); summed over 2.84 + 3 x 2.42 GHz = 10.1 GHz-cores",
                ),
                ("bandwidth_gbs", LPDDR4X),
                (
                    "efficiency",
                    "assumed defaults typical of XNNPACK / TFLite on A76 (dense conv and GEMM \
                     about half of peak, depthwise memory- and shuffle-bound); fit with \
                     CostModel.fit for measured values",
                ),
                (
                    "overhead_us",
                    "assumed per-op dispatch of an interpreter runtime (TFLite)",
                ),
                ("energy", ENERGY),
                ("dram_pj_per_byte", LPDDR4X_PJ),
            ]),
        },
        DeviceProfile {
            name: "adreno-640".into(),
            description: "phone GPU of a Snapdragon 855 class SoC (Adreno 640), OpenCL / Vulkan \
                compute"
                .into(),
            peak_gops: gops(&[("f32", 898.6), ("f16", 1797.1)]),
            bandwidth_gbs: 20.5,
            efficiency: gops(&[
                ("conv", 0.45),
                ("conv_dw", 0.1),
                ("matmul", 0.5),
                ("attention", 0.25),
            ]),
            overhead_us: 25.0,
            kind_overhead_us: BTreeMap::new(),
            view_overhead_us: 0.0,
            energy_scale: 0.16,
            dram_pj_per_byte: 40.0,
            sources: texts(&[
                (
                    "peak_gops",
                    "Adreno 640: 384 FP32 ALUs x 2 flop (FMA) x 585 MHz = 898.6 GFLOP/s, FP16 \
                     at twice the rate (widely reported figures; Qualcomm does not publish \
                     them); no faster int8 path, so int8/int4 run at the f16 rate",
                ),
                ("bandwidth_gbs", LPDDR4X),
                (
                    "efficiency",
                    "assumed defaults for mobile GPU inference runtimes",
                ),
                (
                    "overhead_us",
                    "assumed kernel launch and synchronisation cost per op",
                ),
                ("energy", ENERGY),
                ("dram_pj_per_byte", LPDDR4X_PJ),
            ]),
        },
        DeviceProfile {
            name: "hexagon-npu".into(),
            description: "Snapdragon 8 Gen 2 class Hexagon NPU (HTP): int8 and int4 tensor units, \
                fp16"
                .into(),
            peak_gops: gops(&[("f16", 6500.0), ("int8", 13000.0), ("int4", 26000.0)]),
            bandwidth_gbs: 40.0,
            efficiency: gops(&[
                ("conv", 0.5),
                ("conv_dw", 0.1),
                ("matmul", 0.4),
                ("attention", 0.2),
            ]),
            overhead_us: 10.0,
            kind_overhead_us: BTreeMap::new(),
            view_overhead_us: 0.0,
            energy_scale: 0.1,
            dram_pj_per_byte: 30.0,
            sources: texts(&[
                (
                    "peak_gops",
                    "order-of-magnitude figures for a Snapdragon 8 Gen 2 HTP: about 13 int8 \
                     TOPS for the NPU alone (the vendor quotes SoC totals, not per-unit peaks), \
                     int4 at twice and fp16 at half the int8 rate; f32 executes as fp16. INT2 and \
                     ternary weights run as packed int4 with half the weight bytes",
                ),
                (
                    "bandwidth_gbs",
                    "LPDDR5X-8400, 64-bit bus: 67 GB/s peak; about 60% sustained",
                ),
                (
                    "efficiency",
                    "assumed defaults; fit with CostModel.fit for measured values",
                ),
                ("overhead_us", "assumed per-op cost of a delegated graph"),
                ("energy", ENERGY),
                (
                    "dram_pj_per_byte",
                    "LPDDR5X about 3-4 pJ/bit: 30 pJ/byte; energy_scale 0.1 for a 4 nm node",
                ),
            ]),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_validate_and_round_trip() {
        for d in builtin() {
            d.validate().unwrap();
            assert_eq!(DeviceProfile::from_json(&d.to_json()).unwrap(), d);
        }
        let npu = &builtin()[2];
        assert_eq!(npu.peak("f32"), 6500.0); // falls back to f16
        assert_eq!(npu.peak("int4"), 26000.0);
        let gpu = &builtin()[1];
        assert_eq!(gpu.peak("int4"), 1797.1);
        assert!(DeviceProfile::from_json(
            r#"{"name":"x","peak_gops":{"f64":1},"bandwidth_gbs":1}"#
        )
        .is_err());
        assert!(DeviceProfile::from_json(
            r#"{"name":"x","peak_gops":{"f32":1},"bandwidth_gbs":-1}"#
        )
        .is_err());
    }

    #[test]
    fn the_saved_checksum_is_checked() {
        let mut d = builtin()[0].clone();
        d.bandwidth_gbs = 0.1 + 0.2; // a float that only round-trips when parsed exactly
        let text = d.to_json_with_sha256();
        assert_eq!(DeviceProfile::from_json(&text).unwrap(), d);
        // re-indenting keeps the content, and so the checksum
        let compact =
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&text).unwrap());
        assert_eq!(DeviceProfile::from_json(&compact.unwrap()).unwrap(), d);
        let edited = text.replacen(
            "\"bandwidth_gbs\": 0.30000000000000004",
            "\"bandwidth_gbs\": 0.3",
            1,
        );
        assert_ne!(edited, text);
        let err = DeviceProfile::from_json(&edited).unwrap_err();
        assert!(matches!(err, Error::Format(_)), "{err}");
        let bad_sum = text.replacen("\"sha256\": \"", "\"sha256\": \"1", 1);
        assert!(matches!(
            DeviceProfile::from_json(&bad_sum),
            Err(Error::Format(_))
        ));
    }
}
