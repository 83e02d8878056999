//! Calibration observers: min-max (torch.ao parity), and a mergeable streaming histogram with
//! MSE / percentile / entropy clip-range search.

pub mod histogram;
pub mod minmax;
pub mod observer;
pub mod search;

pub use histogram::Histogram;
pub use minmax::{MinMax, PerChannelMinMax};
pub use observer::{Config as ObserverConfig, Observer, QParams};
pub use search::{Method, SearchResult};
