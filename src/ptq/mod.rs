//! Post-training quantization solvers: GPTQ's Hessian-guided error feedback, on the dense
//! float64 linear algebra it needs, AWQ's activation-aware scales, HQQ's calibration-free
//! grids, and randomized Hadamard rotations.
pub mod awq;
pub mod gptq;
pub mod hadamard;
pub mod hqq;
pub mod linalg;

pub use gptq::{gptq, output_error, Config as GptqConfig, Solution as GptqSolution};
pub use hadamard::Rotation;
