//! The one recursion mechanism behind every operation on nested data (Accelerate's `recursively_apply`):
//! a type says how to visit and how to rebuild the tensors it holds, and every operation — gather,
//! broadcast, reduce, padding, moving to a device, slicing, casting — is written once against it.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tch::{Kind, Tensor};

/// The shape of a value without its tensors' data: where each tensor sits, with its shape and kind, and
/// the value of every other leaf. A dispatching data loader sends it ahead of the tensors so the other
/// processes can make room for them (Accelerate's `get_data_structure` / `initialize_tensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Layout {
    /// A tensor of this shape and kind (an index into hasten's list of kinds).
    Tensor {
        /// Its size.
        shape: Vec<i64>,
        /// Its element kind, coded.
        kind: u8,
    },
    /// The parts of a list, tuple or struct, in order.
    Items(Vec<Layout>),
    /// The entries of a map, by key.
    Entries(Vec<(String, Layout)>),
    /// An `Option` that is `None`.
    Absent,
    /// A leaf that is not a tensor.
    Value(serde_json::Value),
}

/// The kinds a [`Layout`] can carry, by position.
const KINDS: [Kind; 13] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::ComplexHalf,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
    Kind::Bool,
    Kind::BFloat16,
];

fn layout_error(detail: String) -> Error {
    Error::Collective {
        op: "dispatch",
        detail,
    }
}

/// Why `layout` found the wrong kind of node for `T`.
fn mismatch<T>(layout: &Layout) -> Error {
    layout_error(format!(
        "the batch structure sent by process 0 does not fit {}: found {layout:?}",
        std::any::type_name::<T>()
    ))
}

fn items<T: Nested>(layout: &Layout) -> Result<&[Layout]> {
    match layout {
        Layout::Items(items) => Ok(items),
        other => Err(mismatch::<T>(other)),
    }
}

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

    /// The value's [`Layout`], for dispatching batches from process 0. Every type hasten implements
    /// `Nested` for has one; a hand-written implementation without it cannot be dispatched.
    fn layout(&self) -> Result<Layout> {
        Err(layout_error(format!(
            "{} cannot be dispatched from process 0 (its Nested implementation has no layout; use \
             nested_struct!, or dispatch_batches=false)",
            std::any::type_name::<Self>()
        )))
    }

    /// A value of the `layout` sent by process 0, each tensor made by `make(shape, kind)`.
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        let _ = (layout, make);
        Err(layout_error(format!(
            "{} cannot be received from process 0 (its Nested implementation has no from_layout)",
            std::any::type_name::<Self>()
        )))
    }
}

impl Nested for Tensor {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        f(self)
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        f(None, self)
    }
    fn layout(&self) -> Result<Layout> {
        let kind = self
            .f_kind()
            .map_err(|e| crate::Error::torch("dispatch", e))?;
        let code = KINDS.iter().position(|k| *k == kind).ok_or_else(|| {
            layout_error(format!("tensors of kind {kind:?} cannot be dispatched"))
        })?;
        Ok(Layout::Tensor {
            shape: self.size(),
            kind: code as u8,
        })
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        match layout {
            Layout::Tensor { shape, kind } => {
                let kind = KINDS.get(usize::from(*kind)).ok_or_else(|| {
                    layout_error(format!("process 0 sent an unknown tensor kind {kind}"))
                })?;
                make(shape, *kind)
            }
            other => Err(mismatch::<Self>(other)),
        }
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
    fn layout(&self) -> Result<Layout> {
        self.iter()
            .map(T::layout)
            .collect::<Result<_>>()
            .map(Layout::Items)
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        items::<Self>(layout)?
            .iter()
            .map(|l| T::from_layout(l, make))
            .collect()
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
    fn layout(&self) -> Result<Layout> {
        self.as_ref().map_or(Ok(Layout::Absent), T::layout)
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        match layout {
            Layout::Absent => Ok(None),
            other => T::from_layout(other, make).map(Some),
        }
    }
}

impl<T: Nested> Nested for Box<T> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        (**self).visit(f)
    }
    fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        (*self).rebuild(f).map(Box::new)
    }
    fn layout(&self) -> Result<Layout> {
        (**self).layout()
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        T::from_layout(layout, make).map(Box::new)
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

/// The layout of a map's entries, in the order given.
fn entries_layout<'a, T: Nested + 'a>(
    entries: impl Iterator<Item = (&'a String, &'a T)>,
) -> Result<Layout> {
    entries
        .map(|(k, v)| v.layout().map(|l| (k.clone(), l)))
        .collect::<Result<_>>()
        .map(Layout::Entries)
}

/// A map of the entries of `layout`, each value built as a `T` (`M` names the map type in errors).
fn entries_from_layout<M: Nested, T: Nested, C: FromIterator<(String, T)>>(
    layout: &Layout,
    make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
) -> Result<C> {
    match layout {
        Layout::Entries(entries) => entries
            .iter()
            .map(|(k, l)| T::from_layout(l, make).map(|v| (k.clone(), v)))
            .collect(),
        other => Err(mismatch::<M>(other)),
    }
}

/// A HashMap's entries by sorted key: its own order differs between processes.
fn sorted<T>(map: &HashMap<String, T>) -> Vec<(&String, &T)> {
    let mut entries: Vec<(&String, &T)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
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
    fn layout(&self) -> Result<Layout> {
        entries_layout(self.iter())
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        entries_from_layout::<Self, T, _>(layout, make)
    }
}

impl<T: Nested> Nested for HashMap<String, T> {
    // A HashMap's order differs between processes, so visiting, rebuilding and layouts go by sorted key.
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        for (_, v) in sorted(self) {
            v.visit(f);
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
    fn layout(&self) -> Result<Layout> {
        entries_layout(sorted(self).into_iter())
    }
    fn from_layout(
        layout: &Layout,
        make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
    ) -> Result<Self> {
        entries_from_layout::<Self, T, _>(layout, make)
    }
}

macro_rules! passthrough {
    ($($t:ty),*) => {$(
        impl Nested for $t {
            fn visit<'a>(&'a self, _: &mut dyn FnMut(&'a Tensor)) {}
            fn rebuild(self, _: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
                Ok(self)
            }
            fn layout(&self) -> Result<Layout> {
                serde_json::to_value(self)
                    .map(Layout::Value)
                    .map_err(|e| layout_error(format!("a {} leaf: {e}", stringify!($t))))
            }
            fn from_layout(
                layout: &Layout,
                _: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
            ) -> Result<Self> {
                match layout {
                    Layout::Value(v) => <$t>::deserialize(v).map_err(|e| {
                        layout_error(format!("a {} leaf from process 0: {e}", stringify!($t)))
                    }),
                    other => Err(mismatch::<Self>(other)),
                }
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
    String
);

/// A `&'static str` leaf is sent as text but cannot be received (it would leak); use `String`.
impl Nested for &'static str {
    fn visit<'a>(&'a self, _: &mut dyn FnMut(&'a Tensor)) {}
    fn rebuild(self, _: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(self)
    }
}

macro_rules! tuples {
    ($( ($($name:ident : $idx:tt),+) ),*) => {$(
        impl<$($name: Nested),+> Nested for ($($name,)+) {
            fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
                $( self.$idx.visit(f); )+
            }
            fn rebuild(self, f: &mut dyn FnMut(Option<&str>, Tensor) -> Result<Tensor>) -> Result<Self> {
                Ok(($( self.$idx.rebuild(f)?, )+))
            }
            fn layout(&self) -> Result<Layout> {
                Ok(Layout::Items(vec![$( self.$idx.layout()?, )+]))
            }
            fn from_layout(
                layout: &Layout,
                make: &mut dyn FnMut(&[i64], Kind) -> Result<Tensor>,
            ) -> Result<Self> {
                let parts = items::<Self>(layout)?;
                let width = [$( $idx ),+].len();
                if parts.len() != width {
                    return Err(mismatch::<Self>(layout));
                }
                Ok(($( $name::from_layout(&parts[$idx], make)?, )+))
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
            fn layout(&self) -> $crate::Result<$crate::ops::Layout> {
                Ok($crate::ops::Layout::Entries(vec![
                    $( (stringify!($field).to_owned(), $crate::Nested::layout(&self.$field)?), )+
                ]))
            }
            fn from_layout(
                layout: &$crate::ops::Layout,
                make: &mut dyn FnMut(&[i64], $crate::tch::Kind) -> $crate::Result<$crate::tch::Tensor>,
            ) -> $crate::Result<Self> {
                let field = |name: &str| match layout {
                    $crate::ops::Layout::Entries(entries) => entries
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, l)| l.clone())
                        .ok_or_else(|| $crate::Error::Collective {
                            op: "dispatch",
                            detail: format!(
                                "the batch sent by process 0 has no field {name} of {}",
                                stringify!($ty)
                            ),
                        }),
                    other => Err($crate::Error::Collective {
                        op: "dispatch",
                        detail: format!("the batch sent by process 0 is not a {}: {other:?}", stringify!($ty)),
                    }),
                };
                Ok($ty {
                    $( $field: $crate::Nested::from_layout(&field(stringify!($field))?, make)?, )+
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    struct Batch {
        input: Tensor,
        ids: Vec<u64>,
        mask: Option<Tensor>,
    }
    crate::nested_struct!(Batch { input, ids, mask });

    /// Rebuilds `value` from its layout alone, tensors made by `make`.
    fn rebuilt<T: Nested>(value: &T) -> T {
        let layout = value.layout().unwrap();
        // Through JSON, as the layout travels between processes.
        let layout: Layout =
            serde_json::from_str(&serde_json::to_string(&layout).unwrap()).unwrap();
        T::from_layout(&layout, &mut |shape, kind| {
            Ok(Tensor::zeros(shape, (kind, Device::Cpu)))
        })
        .unwrap()
    }

    #[test]
    fn layouts_rebuild_every_kind_of_value() {
        let b = Batch {
            input: Tensor::ones([2, 3], (Kind::BFloat16, Device::Cpu)),
            ids: vec![7, 9],
            mask: None,
        };
        let r = rebuilt(&b);
        assert_eq!(
            (r.input.size(), r.input.kind()),
            (vec![2, 3], Kind::BFloat16)
        );
        assert_eq!((r.ids, r.mask.is_none()), (vec![7, 9], true));

        let mut map = HashMap::new();
        map.insert(
            "b".to_string(),
            Tensor::ones([4], (Kind::Int64, Device::Cpu)),
        );
        map.insert(
            "a".to_string(),
            Tensor::ones([1, 1], (Kind::Bool, Device::Cpu)),
        );
        let r = rebuilt(&(
            map,
            String::from("text"),
            Some(Tensor::ones([5], (Kind::Float, Device::Cpu))),
        ));
        assert_eq!(r.0["b"].size(), [4]);
        assert_eq!(r.0["a"].kind(), Kind::Bool);
        assert_eq!(r.1, "text");
        assert_eq!(r.2.map(|t| t.size()), Some(vec![5]));
    }

    #[test]
    fn a_layout_of_another_type_is_an_error_naming_it() {
        let layout = (Tensor::ones([1], (Kind::Float, Device::Cpu)),)
            .layout()
            .unwrap();
        let e = Vec::<u64>::from_layout(&layout, &mut |_, _| unreachable!()).unwrap_err();
        assert!(e.to_string().contains("u64"), "{e}");
        let e = <(Tensor, Tensor)>::from_layout(&layout, &mut |s, k| {
            Ok(Tensor::zeros(s, (k, Device::Cpu)))
        })
        .unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
