//! Sizes, as Accelerate computes them for device maps and memory estimates: bytes per dtype, size strings
//! ("10GiB"), and the bytes of every module of a model described by its named tensors.

use crate::{Error, Result};
use std::collections::BTreeMap;
use tch::Kind;

/// A tensor known by its shape and dtype only (a model skeleton costs no memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Shape.
    pub shape: Vec<i64>,
    /// Element type.
    pub kind: Kind,
    /// True for a buffer (batch-norm statistics…), false for a parameter.
    pub buffer: bool,
}

impl TensorMeta {
    /// Number of elements (u64::MAX for a shape whose product does not fit: shapes come from files,
    /// and such a shape is refused wherever its size is checked against its bytes, never a panic).
    pub fn numel(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d.max(0) as u64))
            .unwrap_or(u64::MAX)
    }

    /// Bytes the tensor takes, when that fits in a u64.
    pub fn checked_bytes(&self) -> Option<u64> {
        self.numel()
            .checked_mul(self.kind.elt_size_in_bytes() as u64)
    }
}

/// Bytes per element (Accelerate's `dtype_byte_size`): a bool is 1/8, every fp8 kind 1.
pub fn dtype_byte_size(kind: Kind) -> f64 {
    match kind {
        Kind::Bool => 0.125,
        other => other.elt_size_in_bytes() as f64,
    }
}

fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 | Kind::Bool
    )
}

/// Parses a size such as `"10GiB"`, `"1.5GB"`, `"512KiB"` or `"100MB"` into bytes (Accelerate's
/// `convert_file_size_to_int`). A lowercase trailing `b` (`"5Gb"`) means bits. Errors name the input.
pub fn convert_file_size_to_int(size: &str) -> Result<u64> {
    let bad = || Error::InvalidValue {
        name: "size".into(),
        detail: format!(
            "{size:?} is not a valid size: use a number of bytes or a number with a unit, like \"5.0GB\""
        ),
    };
    let upper = size.to_ascii_uppercase();
    let number = |suffix_len: usize| -> Result<f64> {
        size[..size.len() - suffix_len]
            .trim()
            .parse::<f64>()
            .map_err(|_| bad())
    };
    let bytes = if let Ok(n) = size.trim().parse::<i64>() {
        n as f64
    } else if upper.ends_with("GIB") {
        number(3)? * (1u64 << 30) as f64
    } else if upper.ends_with("MIB") {
        number(3)? * (1u64 << 20) as f64
    } else if upper.ends_with("KIB") {
        number(3)? * (1u64 << 10) as f64
    } else if let Some(scale) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3)]
        .iter()
        .find(|(unit, _)| upper.ends_with(unit))
        .map(|(_, s)| *s)
    {
        let n = (number(2)? * scale).trunc();
        if size.ends_with('b') {
            (n / 8.0).trunc()
        } else {
            n
        }
    } else {
        return Err(bad());
    };
    if bytes < 0.0 || !bytes.is_finite() {
        return Err(bad());
    }
    Ok(bytes.trunc() as u64)
}

/// The bytes of every module: `""` for the whole model, then every dotted prefix of every tensor name
/// (Accelerate's `compute_module_sizes`). With `dtype`, floating tensors count at the smaller of their size
/// and `dtype`'s (integers keep theirs, as they are never converted); `special_dtypes` set the size of
/// named tensors; `buffers_only` counts buffers alone.
pub fn compute_module_sizes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a TensorMeta)>,
    dtype: Option<Kind>,
    special_dtypes: &BTreeMap<String, Kind>,
    buffers_only: bool,
) -> BTreeMap<String, u64> {
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for (name, t) in tensors {
        if buffers_only && !t.buffer {
            continue;
        }
        let per = match (special_dtypes.get(name), dtype) {
            (Some(k), _) => dtype_byte_size(*k),
            (None, None) => dtype_byte_size(t.kind),
            (None, Some(_)) if is_integer(t.kind) => dtype_byte_size(t.kind),
            (None, Some(d)) => dtype_byte_size(d).min(dtype_byte_size(t.kind)),
        };
        let size = (t.numel() as f64 * per).ceil() as u64;
        let parts: Vec<&str> = name.split('.').collect();
        for i in 0..=parts.len() {
            *sizes.entry(parts[..i].join(".")).or_default() += size;
        }
    }
    sizes
}

/// The bytes of the model's buffers (Accelerate's `compute_module_total_buffer_size`).
pub fn compute_module_total_buffer_size<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a TensorMeta)>,
    dtype: Option<Kind>,
    special_dtypes: &BTreeMap<String, Kind>,
) -> u64 {
    compute_module_sizes(tensors, dtype, special_dtypes, true)
        .get("")
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(shape: &[i64], kind: Kind, buffer: bool) -> TensorMeta {
        TensorMeta {
            shape: shape.to_vec(),
            kind,
            buffer,
        }
    }

    /// Accelerate's ModelForTest: Linear(3→4), BatchNorm1d(4), Linear(4→5).
    fn model_for_test(kind: Kind) -> Vec<(String, TensorMeta)> {
        vec![
            ("linear1.weight".into(), meta(&[4, 3], kind, false)),
            ("linear1.bias".into(), meta(&[4], kind, false)),
            ("batchnorm.weight".into(), meta(&[4], kind, false)),
            ("batchnorm.bias".into(), meta(&[4], kind, false)),
            ("batchnorm.running_mean".into(), meta(&[4], kind, true)),
            ("batchnorm.running_var".into(), meta(&[4], kind, true)),
            (
                "batchnorm.num_batches_tracked".into(),
                meta(&[], Kind::Int64, true),
            ),
            ("linear2.weight".into(), meta(&[5, 4], kind, false)),
            ("linear2.bias".into(), meta(&[5], kind, false)),
        ]
    }

    fn sizes(model: &[(String, TensorMeta)], dtype: Option<Kind>) -> BTreeMap<String, u64> {
        compute_module_sizes(
            model.iter().map(|(n, t)| (n.as_str(), t)),
            dtype,
            &BTreeMap::new(),
            false,
        )
    }

    #[test]
    fn module_sizes_match_accelerate() {
        let fp32 = sizes(&model_for_test(Kind::Float), None);
        for (key, want) in [
            ("", 236),
            ("linear1", 64),
            ("linear1.weight", 48),
            ("linear1.bias", 16),
            ("batchnorm", 72),
            ("batchnorm.weight", 16),
            ("batchnorm.running_var", 16),
            ("batchnorm.num_batches_tracked", 8),
            ("linear2", 100),
            ("linear2.weight", 80),
            ("linear2.bias", 20),
        ] {
            assert_eq!(fp32[key], want, "fp32 {key:?}");
        }
        // After .half(): floating tensors halve, the int64 counter stays 8 bytes.
        let half = sizes(&model_for_test(Kind::Half), None);
        for (key, want) in [
            ("", 122),
            ("linear1", 32),
            ("batchnorm", 40),
            ("linear2", 50),
            ("linear2.bias", 10),
        ] {
            assert_eq!(half[key], want, "fp16 {key:?}");
        }
        // Asking for fp16 sizes of the fp32 model gives the same.
        assert_eq!(sizes(&model_for_test(Kind::Float), Some(Kind::Half)), half);
    }

    #[test]
    fn total_buffer_size_matches_accelerate() {
        let mut model = model_for_test(Kind::Float);
        model.push(("linear1.extra".into(), meta(&[10, 10], Kind::Float, true)));
        model.push(("extra".into(), meta(&[20, 10], Kind::Float, true)));
        let total = |m: &[(String, TensorMeta)], dtype| {
            compute_module_total_buffer_size(
                m.iter().map(|(n, t)| (n.as_str(), t)),
                dtype,
                &BTreeMap::new(),
            )
        };
        assert_eq!(total(&model, None), 1240);
        assert_eq!(total(&model, Some(Kind::Half)), 624);
    }

    #[test]
    fn dtype_sizes() {
        assert_eq!(dtype_byte_size(Kind::Bool), 0.125);
        assert_eq!(dtype_byte_size(Kind::Half), 2.0);
        assert_eq!(dtype_byte_size(Kind::BFloat16), 2.0);
        assert_eq!(dtype_byte_size(Kind::Float), 4.0);
        assert_eq!(dtype_byte_size(Kind::Double), 8.0);
        for fp8 in [
            Kind::Float8e4m3fn,
            Kind::Float8e5m2,
            Kind::Float8e4m3fnuz,
            Kind::Float8e5m2fnuz,
        ] {
            assert_eq!(dtype_byte_size(fp8), 1.0);
        }
    }

    #[test]
    fn file_sizes_match_accelerate() {
        for (text, want) in [
            ("0MB", 0),
            ("100MB", 100_000_000),
            ("2GiB", 2 << 30),
            ("512KiB", 512 << 10),
            ("1.5GB", 1_500_000_000),
            ("100KB", 100_000),
            ("500", 500),
            ("5Gb", 625_000_000),
        ] {
            assert_eq!(convert_file_size_to_int(text).unwrap(), want, "{text}");
        }
        for bad in ["5MBB", "5k0MB", "-1GB", "ten", ""] {
            let err = convert_file_size_to_int(bad).unwrap_err().to_string();
            assert!(err.contains("not a valid size"), "{bad}: {err}");
        }
    }
}
