//! The one recursion mechanism behind every operation on nested data (Accelerate's `recursively_apply`):
//! a type says how to visit and how to rebuild the tensors it holds, and every operation — gather,
//! broadcast, reduce, padding, moving to a device, slicing, casting — is written once against it.

use crate::Result;
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// Data holding tensors somewhere inside: a tensor, a `Vec`, an `Option`, a tuple, a map, a user struct.
///
/// Leaves that are not tensors (numbers, strings) pass through every operation unchanged, as in
/// Accelerate. Implement it for your own batch types with [`nested_struct!`](crate::nested_struct).
pub trait Nested: Sized {
    /// Calls `f` on every tensor, in a fixed order (the same order on every rank).
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor));

    /// Rebuilds the value with each tensor replaced by `f(tensor)`, in the order of [`Nested::visit`].
    /// `key` is the map key or field name the tensor sits under, for operations that skip some keys.
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self>;
}

impl Nested for Tensor {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        f(self)
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        f(None, self)
    }
}

impl<T: Nested> Nested for Vec<T> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        for item in self {
            item.visit(f);
        }
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        self.into_iter().map(|item| item.rebuild(f)).collect()
    }
}

impl<T: Nested> Nested for Option<T> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        if let Some(v) = self {
            v.visit(f);
        }
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        self.map(|v| v.rebuild(f)).transpose()
    }
}

impl<T: Nested> Nested for Box<T> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        (**self).visit(f)
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        (*self).rebuild(f).map(Box::new)
    }
}

/// Rebuilds one map entry, telling `f` the key for the tensors directly under it.
fn rebuild_keyed<T: Nested>(
    key: &str,
    value: T,
    f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>,
) -> Result<T> {
    value.rebuild(&mut |inner: Option<&str>, t| f(inner.or(Some(key)), t))
}

impl<T: Nested> Nested for BTreeMap<String, T> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        for v in self.values() {
            v.visit(f);
        }
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        self.into_iter()
            .map(|(k, v)| rebuild_keyed(&k, v, f).map(|v| (k, v)))
            .collect()
    }
}

impl<T: Nested> Nested for HashMap<String, T> {
    // A HashMap's order differs between processes, so both visiting and rebuilding go by sorted key.
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        let mut keys: Vec<&String> = self.keys().collect();
        keys.sort();
        for k in keys {
            self[k].visit(f);
        }
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        let mut entries: Vec<(String, T)> = self.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
            .into_iter()
            .map(|(k, v)| rebuild_keyed(&k, v, f).map(|v| (k, v)))
            .collect()
    }
}

macro_rules! passthrough {
    ($($t:ty),*) => {$(
        impl Nested for $t {
            fn visit<'a>(&'a self, _: &mut dyn FnMut(&'a Tensor)) {}
            fn rebuild(self, _: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
                Ok(self)
            }
        }
    )*};
}
passthrough!(
    (),
    bool,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    usize,
    isize,
    f32,
    f64,
    String,
    &'static str
);

macro_rules! tuples {
    ($( ($($name:ident : $idx:tt),+) ),*) => {$(
        impl<$($name: Nested),+> Nested for ($($name,)+) {
            fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
                $( self.$idx.visit(f); )+
            }
            fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
                Ok(($( self.$idx.rebuild(f)?, )+))
            }
        }
    )*};
}
tuples!(
    (A: 0),
    (A: 0, B: 1),
    (A: 0, B: 1, C: 2),
    (A: 0, B: 1, C: 2, D: 3),
    (A: 0, B: 1, C: 2, D: 3, E: 4),
    (A: 0, B: 1, C: 2, D: 3, E: 4, F: 5)
);

/// Implements [`Nested`] for a struct with named fields, each of which is itself `Nested`.
/// Field names act as keys (for `send_to_device`'s `skip_keys`).
///
/// ```
/// use hasten::tch::Tensor;
/// struct Batch { input: Tensor, labels: Tensor, ids: Vec<u64> }
/// hasten::nested_struct!(Batch { input, labels, ids });
/// ```
#[macro_export]
macro_rules! nested_struct {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::Nested for $ty {
            fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a $crate::tch::Tensor)) {
                $( $crate::Nested::visit(&self.$field, f); )+
            }
            fn rebuild(
                self,
                f: &mut dyn FnMut(Option<&str>, $crate::tch::Tensor) -> $crate::Result<$crate::tch::Tensor>,
            ) -> $crate::Result<Self> {
                Ok($ty {
                    $( $field: $crate::Nested::rebuild(self.$field, &mut |inner: Option<&str>, t| {
                        f(inner.or(Some(stringify!($field))), t)
                    })?, )+
                })
            }
        }
    };
}

/// The tensors of `data`, in visiting order.
pub fn tensors_of<T: Nested>(data: &T) -> Vec<&Tensor> {
    let mut out = Vec::new();
    data.visit(&mut |t| out.push(t));
    out
}

/// Applies `f` to every tensor of `data` (a convenience over [`Nested::rebuild`] ignoring keys).
pub fn map_tensors<T: Nested>(data: T, mut f: impl FnMut(Tensor) -> Result<Tensor>) -> Result<T> {
    data.rebuild(&mut |_, t| f(t))
}
