//! NAS cost models: an op graph with exact FLOP and parameter counts, device profiles, a
//! roofline latency / energy / memory estimate, a cost model fitted to measurements, and
//! search spaces scored in bulk.
pub mod cost;
pub mod device;
pub mod fit;
pub mod graph;
pub mod space;
