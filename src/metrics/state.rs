//! A metric's exact partial state: what shards and resumable runs save and merge.
//!
//! Owns: [`State`], named flat arrays of sums, counts and per-sequence rows, exact in their
//! own types (f64 sums stay f64, f32 rows stay f32 bit for bit, NaN included), and its
//! (de)serialisation as safetensors tensors. Must not: know any metric; each metric decides
//! what its state is (sums and counts, never means: a mean of shard means is not the mean).

use std::collections::BTreeMap;

use safetensors::Dtype;

use crate::error::{Error, Result};

/// One array of a state.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

impl Array {
    fn dtype(&self) -> Dtype {
        match self {
            Array::F32(_) => Dtype::F32,
            Array::F64(_) => Dtype::F64,
            Array::U32(_) => Dtype::U32,
            Array::U64(_) => Dtype::U64,
        }
    }

    fn len(&self) -> usize {
        match self {
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::U64(v) => v.len(),
        }
    }

    /// Little-endian bytes, as safetensors stores them.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match self {
            Array::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Array::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Array::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Array::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub(crate) fn from_bytes(dtype: Dtype, bytes: &[u8]) -> Result<Self> {
        fn chunks<const N: usize, T>(b: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| f(c.try_into().expect("exact chunk")))
                .collect()
        }
        Ok(match dtype {
            Dtype::F32 => Array::F32(chunks(bytes, f32::from_le_bytes)),
            Dtype::F64 => Array::F64(chunks(bytes, f64::from_le_bytes)),
            Dtype::U32 => Array::U32(chunks(bytes, u32::from_le_bytes)),
            Dtype::U64 => Array::U64(chunks(bytes, u64::from_le_bytes)),
            other => return Err(Error::Other(format!("state array of dtype {other:?}"))),
        })
    }

    pub(crate) fn shape_and_dtype(&self) -> (Vec<usize>, Dtype) {
        (vec![self.len()], self.dtype())
    }
}

/// A metric's partial state over some batches of one dataset: named flat arrays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub arrays: BTreeMap<String, Array>,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, key: &str, a: Array) -> &mut Self {
        self.arrays.insert(key.to_string(), a);
        self
    }

    fn get(&self, metric: &str, key: &str) -> Result<&Array> {
        self.arrays.get(key).ok_or_else(|| Error::Metric {
            metric: metric.to_string(),
            msg: format!("saved state has no '{key}' (saved by another version?)"),
        })
    }

    fn wrong(metric: &str, key: &str, want: &str) -> Error {
        Error::Metric {
            metric: metric.to_string(),
            msg: format!("saved state '{key}' is not {want}"),
        }
    }

    pub fn f32(&self, metric: &str, key: &str) -> Result<&[f32]> {
        match self.get(metric, key)? {
            Array::F32(v) => Ok(v),
            _ => Err(Self::wrong(metric, key, "f32")),
        }
    }

    pub fn f64(&self, metric: &str, key: &str) -> Result<&[f64]> {
        match self.get(metric, key)? {
            Array::F64(v) => Ok(v),
            _ => Err(Self::wrong(metric, key, "f64")),
        }
    }

    pub fn u32(&self, metric: &str, key: &str) -> Result<&[u32]> {
        match self.get(metric, key)? {
            Array::U32(v) => Ok(v),
            _ => Err(Self::wrong(metric, key, "u32")),
        }
    }

    pub fn u64(&self, metric: &str, key: &str) -> Result<&[u64]> {
        match self.get(metric, key)? {
            Array::U64(v) => Ok(v),
            _ => Err(Self::wrong(metric, key, "u64")),
        }
    }

    /// An array whose length must be `n` (a mismatch means the state is not this run's).
    pub fn f64_n(&self, metric: &str, key: &str, n: usize) -> Result<&[f64]> {
        let v = self.f64(metric, key)?;
        if v.len() != n {
            return Err(Error::Metric {
                metric: metric.to_string(),
                msg: format!(
                    "saved state '{key}' has {} values, expected {n} (other heads or options?)",
                    v.len()
                ),
            });
        }
        Ok(v)
    }
}
