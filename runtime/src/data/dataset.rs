//! Datasets and collation: what a data loader reads and how items become a batch.

use crate::{Error, Result};
use tch::{Kind, Tensor};

/// A map-style dataset: `len()` items addressed by index (PyTorch's `Dataset`).
pub trait Dataset: Send + Sync {
    /// One sample.
    type Item: Send;
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when there is no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index` (`0..len()`).
    fn get(&self, index: usize) -> Self::Item;
}

/// Tensors whose first dimension indexes the samples: `(inputs, targets)` with `inputs[i]`, `targets[i]`
/// as sample `i` (PyTorch's `TensorDataset`). Built from a tuple, its samples and batches are that tuple
/// (`TensorDataset::from_tensors((x, y))?` gives `(Tensor, Tensor)` batches: `let (x, y) = batch?;`);
/// built from a `Vec` with [`TensorDataset::new`], they are `Vec<Tensor>`.
pub struct TensorDataset<T = Vec<Tensor>> {
    tensors: Vec<Tensor>,
    len: usize,
    item: std::marker::PhantomData<fn() -> T>,
}

/// What a [`TensorDataset`]'s samples are: a `Vec` of tensors or a tuple of one to four.
pub trait TensorTuple: Send + Sized + 'static {
    /// The tensors, in order.
    fn into_tensors(self) -> Vec<Tensor>;
    /// One sample from one row of each tensor, in order (as many as `into_tensors` gave).
    fn from_rows(rows: Vec<Tensor>) -> Self;
}

impl TensorTuple for Vec<Tensor> {
    fn into_tensors(self) -> Vec<Tensor> {
        self
    }
    fn from_rows(rows: Vec<Tensor>) -> Self {
        rows
    }
}

macro_rules! tensor_tuple {
    ($($name:ident),+) => {
        impl TensorTuple for ($(tensor_tuple!(@t $name),)+) {
            fn into_tensors(self) -> Vec<Tensor> {
                #[allow(non_snake_case)]
                let ($($name,)+) = self;
                vec![$($name),+]
            }
            fn from_rows(rows: Vec<Tensor>) -> Self {
                let mut rows = rows.into_iter();
                ($(tensor_tuple!(@next rows $name),)+)
            }
        }
    };
    (@t $name:ident) => { Tensor };
    (@next $rows:ident $name:ident) => {
        $rows.next().expect("a TensorDataset row has one tensor per column")
    };
}
tensor_tuple!(A);
tensor_tuple!(A, B);
tensor_tuple!(A, B, C);
tensor_tuple!(A, B, C, D);

impl TensorDataset<Vec<Tensor>> {
    /// A dataset over `tensors`, which must share their first dimension; samples are `Vec<Tensor>`.
    pub fn new(tensors: Vec<Tensor>) -> Result<Self> {
        Self::from_tensors(tensors)
    }
}

impl<T: TensorTuple> TensorDataset<T> {
    /// A dataset over `tensors` (a tuple, or a `Vec`), which must share their first dimension; samples
    /// and batches have the same shape as `tensors`.
    pub fn from_tensors(tensors: T) -> Result<Self> {
        let tensors = tensors.into_tensors();
        let len = tensors
            .first()
            .map_or(0, |t| t.size().first().copied().unwrap_or(0));
        if let Some((index, bad)) = tensors
            .iter()
            .enumerate()
            .find(|(_, t)| t.size().first().copied() != Some(len))
        {
            return Err(Error::DatasetLengths {
                first_dim: len,
                index,
                shape: bad.size(),
            });
        }
        Ok(TensorDataset {
            tensors,
            len: usize::try_from(len).unwrap_or(0),
            item: std::marker::PhantomData,
        })
    }
}

// SAFETY: the tensors are never mutated after construction; `get` only makes views (`select`), and
// libtorch's tensor handles are atomically reference-counted, so reads from several data workers at once
// are safe. tch marks Tensor Send but not Sync only because it cannot know a tensor is read-only.
unsafe impl<T> Sync for TensorDataset<T> {}

impl<T: TensorTuple> Dataset for TensorDataset<T> {
    type Item = T;

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize) -> T {
        T::from_rows(self.tensors.iter().map(|t| t.get(index as i64)).collect())
    }
}

/// How a list of samples becomes one batch. Implemented for tensors (stacked), numbers (a 1-d tensor),
/// `Vec`s of those (position by position) and tuples; a data loader can take any other function.
pub trait Collate: Sized {
    /// The batch type.
    type Batch: Send;
    /// Builds one batch from samples.
    fn collate(items: Vec<Self>) -> Result<Self::Batch>;
}

fn stack(items: &[Tensor]) -> Result<Tensor> {
    Tensor::f_stack(items, 0).map_err(|e| Error::torch("collate (stack)", e))
}

impl Collate for Tensor {
    type Batch = Tensor;
    fn collate(items: Vec<Self>) -> Result<Tensor> {
        stack(&items)
    }
}

macro_rules! collate_numbers {
    ($($t:ty => $kind:expr),*) => {$(
        impl Collate for $t {
            type Batch = Tensor;
            fn collate(items: Vec<Self>) -> Result<Tensor> {
                Ok(Tensor::from_slice(&items).to_kind($kind))
            }
        }
    )*};
}
collate_numbers!(i64 => Kind::Int64, i32 => Kind::Int, f32 => Kind::Float, f64 => Kind::Double);

impl Collate for Vec<Tensor> {
    type Batch = Vec<Tensor>;
    fn collate(items: Vec<Self>) -> Result<Vec<Tensor>> {
        let width = items.first().map_or(0, Vec::len);
        if let Some((index, item)) = items.iter().enumerate().find(|(_, i)| i.len() != width) {
            return Err(Error::StructureMismatch {
                op: "collate",
                expected: width,
                index,
                found: item.len(),
            });
        }
        (0..width)
            .map(|j| {
                let column: Vec<Tensor> =
                    items.iter().map(|item| item[j].shallow_clone()).collect();
                stack(&column)
            })
            .collect()
    }
}

macro_rules! collate_tuples {
    ($( ($($name:ident : $idx:tt),+) ),*) => {$(
        impl<$($name: Collate),+> Collate for ($($name,)+) {
            type Batch = ($($name::Batch,)+);
            #[allow(non_snake_case)]
            fn collate(items: Vec<Self>) -> Result<Self::Batch> {
                $( let mut $name = Vec::with_capacity(items.len()); )+
                for item in items {
                    $( $name.push(item.$idx); )+
                }
                Ok(($( $name::collate($name)?, )+))
            }
        }
    )*};
}
collate_tuples!((A: 0, B: 1), (A: 0, B: 1, C: 2), (A: 0, B: 1, C: 2, D: 3));

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_tensor_dataset_built_from_a_tuple_gives_tuples() {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([6, 2]);
        let y = Tensor::arange(6, (Kind::Int64, Device::Cpu));
        let ds = TensorDataset::from_tensors((x, y)).unwrap();
        let (xs, ys) = ds.get(4);
        assert_eq!((xs.size(), ys.int64_value(&[])), (vec![2], 4));
        let loader = crate::data::DataLoader::new(ds, 4);
        let batches: Vec<(Tensor, Tensor)> = loader.iter().map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1].0.size(), [2, 2]);
        assert_eq!(Vec::<i64>::try_from(&batches[1].1).unwrap(), vec![4, 5]);
        let three = TensorDataset::from_tensors((
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3, 2], (Kind::Float, Device::Cpu)),
            Tensor::ones([4], (Kind::Float, Device::Cpu)),
        ));
        let err = three.err().unwrap().to_string();
        assert!(err.contains("same first dimension"), "{err}");
    }

    #[test]
    fn tensor_dataset_and_default_collation() {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([6, 2]);
        let y = Tensor::arange(6, (Kind::Int64, Device::Cpu));
        let ds = TensorDataset::new(vec![x, y]).unwrap();
        assert_eq!(ds.len(), 6);
        let batch = Vec::<Tensor>::collate((0..3).map(|i| ds.get(i)).collect()).unwrap();
        assert_eq!(batch[0].size(), [3, 2]);
        assert_eq!(Vec::<i64>::try_from(&batch[1]).unwrap(), vec![0, 1, 2]);
        let (a, b) = <(Tensor, i64)>::collate(vec![
            (Tensor::ones([2], (Kind::Float, Device::Cpu)), 4),
            (Tensor::zeros([2], (Kind::Float, Device::Cpu)), 5),
        ])
        .unwrap();
        assert_eq!(
            (a.size(), Vec::<i64>::try_from(&b).unwrap()),
            (vec![2, 2], vec![4, 5])
        );
        let bad = TensorDataset::new(vec![
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([4], (Kind::Float, Device::Cpu)),
        ]);
        assert!(
            bad.err()
                .unwrap()
                .to_string()
                .contains("same first dimension")
        );
    }
}
