//! A model skeleton: its modules (dotted paths, class names) and tensors (shapes, dtypes), with no tensor
//! memory at all — the description device maps and memory estimates work on.

use super::sizes::{TensorMeta, compute_module_sizes};
use std::collections::{BTreeMap, HashMap};
use tch::Kind;

/// A model described by its named tensors, in registration order, plus the class of any module that
/// matters (for `no_split_module_classes`) and groups of tied (shared) parameters.
#[derive(Debug, Clone, Default)]
pub struct ModelSkeleton {
    tensors: Vec<(String, TensorMeta)>,
    classes: HashMap<String, String>,
    tied: Vec<Vec<String>>,
}

impl ModelSkeleton {
    /// An empty skeleton.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter.
    pub fn param(mut self, name: &str, shape: &[i64], kind: Kind) -> Self {
        self.tensors.push((
            name.to_owned(),
            TensorMeta {
                shape: shape.to_vec(),
                kind,
                buffer: false,
            },
        ));
        self
    }

    /// Adds a buffer.
    pub fn buffer(mut self, name: &str, shape: &[i64], kind: Kind) -> Self {
        self.tensors.push((
            name.to_owned(),
            TensorMeta {
                shape: shape.to_vec(),
                kind,
                buffer: true,
            },
        ));
        self
    }

    /// Names the class of the module at `path` (as `no_split_module_classes` refers to it).
    pub fn class(mut self, path: &str, class: &str) -> Self {
        self.classes.insert(path.to_owned(), class.to_owned());
        self
    }

    /// Declares that parameter `alias` is the same tensor as `original` (tied weights). The alias holds
    /// no memory of its own.
    pub fn tie(mut self, alias: &str, original: &str) -> Self {
        match self
            .tied
            .iter_mut()
            .find(|g| g.iter().any(|n| n == original || n == alias))
        {
            Some(group) => {
                for n in [original, alias] {
                    if !group.iter().any(|g| g == n) {
                        group.push(n.to_owned());
                    }
                }
            }
            None => self.tied.push(vec![original.to_owned(), alias.to_owned()]),
        }
        self
    }

    /// Every tensor, in registration order.
    pub fn tensors(&self) -> &[(String, TensorMeta)] {
        &self.tensors
    }

    /// Groups of tied parameter names (Accelerate's `find_tied_parameters`).
    pub fn tied_parameters(&self) -> &[Vec<String>] {
        &self.tied
    }

    /// The class of a module, if named.
    pub fn class_of(&self, path: &str) -> Option<&str> {
        self.classes.get(path).map(String::as_str)
    }

    /// Bytes of every module ([`compute_module_sizes`] over this skeleton).
    pub fn module_sizes(
        &self,
        dtype: Option<Kind>,
        special_dtypes: &BTreeMap<String, Kind>,
    ) -> BTreeMap<String, u64> {
        compute_module_sizes(
            self.tensors.iter().map(|(n, t)| (n.as_str(), t)),
            dtype,
            special_dtypes,
            false,
        )
    }

    pub(crate) fn is_tensor(&self, path: &str) -> bool {
        self.tensors.iter().any(|(n, _)| n == path)
    }

    /// The direct submodules of `module`, in registration order.
    pub fn children(&self, module: &str) -> Vec<String> {
        let prefix = if module.is_empty() {
            String::new()
        } else {
            format!("{module}.")
        };
        let mut out: Vec<String> = Vec::new();
        for (name, _) in &self.tensors {
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            if let Some((child, _)) = rest.split_once('.') {
                let path = format!("{prefix}{child}");
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        out
    }

    /// The tensors held directly by `module` (not by its submodules): (name, is buffer).
    pub fn direct_tensors(&self, module: &str) -> Vec<(String, bool)> {
        let prefix = if module.is_empty() {
            String::new()
        } else {
            format!("{module}.")
        };
        self.tensors
            .iter()
            .filter(|(n, _)| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('.'))
            })
            .map(|(n, t)| (n.clone(), t.buffer))
            .collect()
    }

    /// True when `path` is a module with submodules (a tensor or a leaf module has none).
    pub(crate) fn has_children(&self, path: &str) -> bool {
        !self.is_tensor(path) && !self.children(path).is_empty()
    }
}
