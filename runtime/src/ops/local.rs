//! Operations on nested data that need no other process: concatenate, slice, move, cast, listify.

use super::nested::{Nested, map_tensors, tensors_of};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

pub(crate) fn torch(op: &'static str) -> impl Fn(tch::TchError) -> Error {
    move |source| Error::torch(op, source)
}

/// Concatenates a list of structures position by position along `dim` (Accelerate's `concatenate`):
/// tensors at the same place are joined, other leaves come from the first element. A single-element list
/// returns its element unchanged.
pub fn concatenate<T: Nested>(mut data: Vec<T>, dim: i64) -> Result<T> {
    if data.len() <= 1 {
        return data.pop().ok_or(Error::EmptyInput { op: "concatenate" });
    }
    let columns: Vec<Vec<&Tensor>> = data.iter().map(|d| tensors_of(d)).collect();
    let width = columns[0].len();
    if let Some((i, c)) = columns.iter().enumerate().find(|(_, c)| c.len() != width) {
        return Err(Error::StructureMismatch {
            op: "concatenate",
            expected: width,
            index: i,
            found: c.len(),
        });
    }
    let joined: Vec<Tensor> = (0..width)
        .map(|j| {
            let parts: Vec<&Tensor> = columns.iter().map(|c| c[j]).collect();
            Tensor::f_cat(&parts, dim).map_err(torch("concatenate"))
        })
        .collect::<Result<_>>()?;
    let first = data.swap_remove(0);
    let mut it = joined.into_iter();
    map_tensors(first, |_| {
        // map_tensors visits the tensors tensors_of listed, in that order: one joined tensor each. Only a
        // Nested impl whose two methods disagree can run out.
        it.next().ok_or_else(|| Error::InvalidValue {
            name: "Nested impl".into(),
            detail: format!(
                "concatenate: map_tensors visits more tensors than the {width} tensors_of lists"
            ),
        })
    })
}

/// Slices every tensor along its first dimension to `range` (Accelerate's `slice_tensors`).
pub fn slice_tensors<T: Nested>(data: T, range: std::ops::Range<i64>) -> Result<T> {
    map_tensors(data, |t| {
        t.f_slice(0, range.start, range.end, 1)
            .map_err(torch("slice_tensors"))
    })
}

/// Moves every tensor to `device`, except those under a key in `skip_keys` (Accelerate's
/// `send_to_device`). With `non_blocking`, host-to-GPU copies from pinned memory do not wait.
pub fn send_to_device<T: Nested>(
    data: T,
    device: Device,
    non_blocking: bool,
    skip_keys: &[&str],
) -> Result<T> {
    data.rebuild(&mut |key, t| {
        if key.is_some_and(|k| skip_keys.contains(&k)) || t.device() == device {
            return Ok(t);
        }
        t.f_to_device_(device, t.kind(), non_blocking, false)
            .map_err(torch("send_to_device"))
    })
}

/// Converts fp16 and bf16 tensors to fp32, leaving the rest (Accelerate's `convert_to_fp32`).
pub fn convert_to_fp32<T: Nested>(data: T) -> Result<T> {
    map_tensors(data, |t| match t.kind() {
        Kind::Half | Kind::BFloat16 => t.f_to_kind(Kind::Float).map_err(torch("convert_to_fp32")),
        _ => Ok(t),
    })
}

/// A tensor as nested JSON lists of numbers (bf16 and fp16 go through fp32), as Accelerate's `listify`.
pub fn listify_tensor(t: &Tensor) -> Result<serde_json::Value> {
    let t = t.f_to_device(Device::Cpu).map_err(torch("listify"))?;
    let t = match t.kind() {
        Kind::Half | Kind::BFloat16 => t.f_to_kind(Kind::Float).map_err(torch("listify"))?,
        _ => t,
    };
    let shape = t.size();
    let flat: Vec<serde_json::Value> = match t.kind() {
        Kind::Float | Kind::Double => Vec::<f64>::try_from(t.flatten(0, -1).to_kind(Kind::Double))
            .map_err(torch("listify"))?
            .into_iter()
            .map(serde_json::Value::from)
            .collect(),
        Kind::Bool => Vec::<bool>::try_from(t.flatten(0, -1))
            .map_err(torch("listify"))?
            .into_iter()
            .map(serde_json::Value::from)
            .collect(),
        _ => Vec::<i64>::try_from(t.flatten(0, -1).to_kind(Kind::Int64))
            .map_err(torch("listify"))?
            .into_iter()
            .map(serde_json::Value::from)
            .collect(),
    };
    fn nest(flat: &[serde_json::Value], shape: &[i64]) -> serde_json::Value {
        match shape.split_first() {
            None => flat.first().cloned().unwrap_or(serde_json::Value::Null),
            Some((&n, rest)) => {
                let step = rest.iter().product::<i64>().max(0) as usize;
                serde_json::Value::Array(
                    (0..n.max(0) as usize)
                        .map(|i| nest(&flat[i * step..(i + 1) * step], rest))
                        .collect(),
                )
            }
        }
    }
    Ok(nest(&flat, &shape))
}

/// Every tensor of `data` as nested lists, in visiting order.
pub fn listify<T: Nested>(data: &T) -> Result<Vec<serde_json::Value>> {
    tensors_of(data).into_iter().map(listify_tensor).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn concatenate_like_accelerate() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        assert_eq!(
            concatenate(vec![a.shallow_clone(), b.shallow_clone()], 0)
                .unwrap()
                .size(),
            [4, 3]
        );
        // Lists/tuples are joined position by position.
        let pairs = vec![
            (
                a.shallow_clone(),
                Tensor::ones([2, 4], (Kind::Float, Device::Cpu)),
            ),
            (
                b.shallow_clone(),
                Tensor::ones([2, 4], (Kind::Float, Device::Cpu)),
            ),
        ];
        let (x, y) = concatenate(pairs, 0).unwrap();
        assert_eq!((x.size(), y.size()), (vec![4, 3], vec![4, 4]));
        // A single element comes back unchanged, whatever it is.
        assert_eq!(
            concatenate(vec!["just a string".to_owned()], 0).unwrap(),
            "just a string"
        );
        let mut m1 = BTreeMap::new();
        m1.insert("x".to_owned(), t(&[1.0]));
        let mut m2 = BTreeMap::new();
        m2.insert("x".to_owned(), t(&[2.0]));
        let m = concatenate(vec![m1, m2], 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&m["x"]).unwrap(), vec![1.0, 2.0]);
        assert!(concatenate(Vec::<Tensor>::new(), 0).is_err());
        assert!(concatenate(vec![vec![a.shallow_clone()], vec![]], 0).is_err());
    }

    #[test]
    fn slicing_moving_casting() {
        let data = (Tensor::arange(10, (Kind::Int64, Device::Cpu)), 7u32);
        let (s, n) = slice_tensors(data, 2..5).unwrap();
        assert_eq!(Vec::<i64>::try_from(&s).unwrap(), vec![2, 3, 4]);
        assert_eq!(n, 7);
        let half = Tensor::ones([2], (Kind::Half, Device::Cpu));
        let ints = Tensor::ones([2], (Kind::Int, Device::Cpu));
        let (h, i) = convert_to_fp32((half, ints)).unwrap();
        assert_eq!((h.kind(), i.kind()), (Kind::Float, Kind::Int));
        let mut m = BTreeMap::new();
        m.insert("keep".to_owned(), t(&[1.0]));
        m.insert("move".to_owned(), t(&[2.0]));
        let moved = send_to_device(m, Device::Cpu, false, &["keep"]).unwrap();
        assert_eq!(moved["move"].device(), Device::Cpu);
    }

    struct Batch {
        input: Tensor,
        labels: Tensor,
        ids: Vec<u64>,
    }
    crate::nested_struct!(Batch { input, labels, ids });

    #[test]
    fn user_structs_take_part_through_the_macro() {
        let batch = Batch {
            input: Tensor::ones([4, 2], (Kind::Half, Device::Cpu)),
            labels: Tensor::arange(4, (Kind::Int64, Device::Cpu)),
            ids: vec![7, 8, 9, 10],
        };
        let b = convert_to_fp32(slice_tensors(batch, 1..3).unwrap()).unwrap();
        assert_eq!(b.input.size(), [2, 2]);
        assert_eq!(b.input.kind(), Kind::Float);
        assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), vec![1, 2]);
        assert_eq!(b.ids, vec![7, 8, 9, 10], "non-tensor fields pass through");
        // Field names are keys for skip_keys.
        let moved = send_to_device(b, Device::Cpu, false, &["labels"]).unwrap();
        assert_eq!(crate::tensors_of(&moved).len(), 2);
    }

    #[test]
    fn listify_nests_and_widens() {
        let x = Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([2, 3]);
        assert_eq!(
            listify_tensor(&x).unwrap(),
            serde_json::json!([[0, 1, 2], [3, 4, 5]])
        );
        let b = t(&[0.5, 1.5]).to_kind(Kind::BFloat16);
        assert_eq!(listify_tensor(&b).unwrap(), serde_json::json!([0.5, 1.5]));
        assert_eq!(
            listify_tensor(&Tensor::from(3i64)).unwrap(),
            serde_json::json!(3)
        );
        assert_eq!(listify(&vec![x]).unwrap().len(), 1);
    }
}
