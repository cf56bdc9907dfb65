//! The values a plugin works with: metric families as ordinary nested Rust values, plus the
//! WIT's own description, capability and error types.

pub use crate::bindings::picket::plugin::types::{Capability, Description, HostError, MetricKind};

/// One metric family: a name, a type, a help text and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: MetricKind,
    pub help: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Vec<Label>,
    pub value: Value,
    /// Milliseconds since the Unix epoch when the source measured it; `None` lets the agent
    /// stamp the collection time.
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Summary(Summary),
    Histogram(Histogram),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub quantiles: Vec<Quantile>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantile {
    pub quantile: f64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    /// Cumulative buckets in increasing order of upper bound, ending with `+Inf`.
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub upper_bound: f64,
    pub cumulative_count: u64,
}
