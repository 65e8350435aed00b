//! A model skeleton: its modules (dotted paths, class names) and tensors (shapes, dtypes), with no tensor
//! memory at all — the description device maps and memory estimates work on.
//!
//! Order matters as it does in PyTorch, where Accelerate reads it from the module tree: modules keep
//! their registration order (`named_children`), tensors theirs (`named_parameters`, `state_dict`). A module
//! may own no tensor (an activation, a dropout, a module whose parameters are all tied to another's): it is
//! still a module, listed in device maps where Accelerate lists it.

use super::sizes::{TensorMeta, compute_module_sizes};
use std::collections::{BTreeMap, HashMap, HashSet};
use tch::Kind;

/// A model described by its modules and named tensors, in registration order, plus the class of any
/// module that matters (for `no_split_module_classes`) and groups of tied (shared) parameters.
///
/// Built by hand, the registration order is the order of the calls: [`param`](Self::param) and
/// [`buffer`](Self::buffer) register the modules on a tensor's path when first named, and
/// [`class`](Self::class) registers a module (with or without tensors) at that point.
#[derive(Debug, Clone, Default)]
pub struct ModelSkeleton {
    /// Tensors holding memory, in registration order.
    tensors: Vec<(String, TensorMeta)>,
    /// Where each tensor is in `tensors`.
    tensor_index: HashMap<String, usize>,
    /// Every module but the root, in registration order.
    modules: Vec<String>,
    /// Direct submodules of each module (`""`: the root), in registration order.
    children: HashMap<String, Vec<String>>,
    /// Direct state-dict names of each module (its tensors and tied aliases), in registration order.
    direct: HashMap<String, Vec<String>>,
    /// Parameter names that hold no memory of their own (the later names of tied groups).
    aliases: HashSet<String>,
    /// Buffers registered with `persistent=False`: in the model, not in its state dict.
    non_persistent: HashSet<String>,
    classes: HashMap<String, String>,
    tied: Vec<Vec<String>>,
}

/// The module holding `name` (`""` for a root tensor).
pub(crate) fn parent_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(parent, _)| parent)
}

impl ModelSkeleton {
    /// An empty skeleton.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers module `path` and the modules above it, unless already known (or a tensor's name).
    pub(crate) fn register_module(&mut self, path: &str) {
        if path.is_empty() || self.children.contains_key(path) || self.is_tensor(path) {
            return;
        }
        let parent = parent_of(path);
        self.register_module(parent);
        self.modules.push(path.to_owned());
        self.children.insert(path.to_owned(), Vec::new());
        self.children
            .entry(parent.to_owned())
            .or_default()
            .push(path.to_owned());
    }

    fn add_tensor(mut self, name: &str, meta: TensorMeta) -> Self {
        if let Some(&i) = self.tensor_index.get(name) {
            self.tensors[i].1 = meta;
            return self;
        }
        let parent = parent_of(name);
        self.register_module(parent);
        let direct = self.direct.entry(parent.to_owned()).or_default();
        if !direct.iter().any(|n| n == name) {
            direct.push(name.to_owned());
        }
        self.aliases.remove(name);
        self.tensor_index
            .insert(name.to_owned(), self.tensors.len());
        self.tensors.push((name.to_owned(), meta));
        self
    }

    /// Adds a parameter.
    pub fn param(self, name: &str, shape: &[i64], kind: Kind) -> Self {
        self.add_tensor(
            name,
            TensorMeta {
                shape: shape.to_vec(),
                kind,
                buffer: false,
            },
        )
    }

    /// Adds a buffer.
    pub fn buffer(self, name: &str, shape: &[i64], kind: Kind) -> Self {
        self.add_tensor(
            name,
            TensorMeta {
                shape: shape.to_vec(),
                kind,
                buffer: true,
            },
        )
    }

    /// Adds a non-persistent buffer (PyTorch's `register_buffer(..., persistent=False)`): it counts in
    /// sizes and device maps, but is not in the state dict, so [`check_device_map`] does not ask for a
    /// device for it.
    ///
    /// [`check_device_map`]: crate::big_modeling::check_device_map
    pub fn non_persistent_buffer(mut self, name: &str, shape: &[i64], kind: Kind) -> Self {
        self.non_persistent.insert(name.to_owned());
        self.buffer(name, shape, kind)
    }

    /// Declares the module at `path` and names its class (as `no_split_module_classes` refers to it). A
    /// module not known yet is registered here, so a module without tensors (`("act", "ReLU")`) takes its
    /// place among its siblings.
    pub fn class(mut self, path: &str, class: &str) -> Self {
        if !self.is_tensor(path) {
            self.register_module(path);
            self.classes.insert(path.to_owned(), class.to_owned());
        }
        self
    }

    /// Records `name` as a parameter that holds no memory (a tied alias), at this point of its module's
    /// registration order.
    pub(crate) fn register_alias(&mut self, name: &str) {
        if let Some(i) = self.tensor_index.remove(name) {
            self.tensors.remove(i);
            for (n, _) in &self.tensors[i..] {
                if let Some(at) = self.tensor_index.get_mut(n) {
                    *at -= 1;
                }
            }
        }
        let parent = parent_of(name);
        self.register_module(parent);
        let direct = self.direct.entry(parent.to_owned()).or_default();
        if !direct.iter().any(|n| n == name) {
            direct.push(name.to_owned());
        }
        self.aliases.insert(name.to_owned());
    }

    /// Declares that parameter `alias` is the same tensor as `original` (tied weights). The alias holds
    /// no memory of its own: a tensor already added under that name is dropped (its place in its
    /// module's order is kept), and a module holding only aliases stays a module of size 0.
    pub fn tie(mut self, alias: &str, original: &str) -> Self {
        self.register_alias(alias);
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
                // As find_tied_parameters lists them: names sorted as plain strings.
                group.sort();
            }
            None => {
                let mut group = vec![original.to_owned(), alias.to_owned()];
                group.sort();
                self.tied.push(group);
            }
        }
        self
    }

    /// Every tensor holding memory, in registration order (tied aliases are not tensors of their own).
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

    /// Every module, root (`""`) first, depth first in registration order (PyTorch's `named_modules`).
    pub fn named_modules(&self) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut stack: Vec<&String> = self
            .children
            .get("")
            .map(|c| c.iter().rev().collect())
            .unwrap_or_default();
        while let Some(module) = stack.pop() {
            out.push(module.clone());
            if let Some(children) = self.children.get(module) {
                stack.extend(children.iter().rev());
            }
        }
        out
    }

    /// True for the root and every registered module.
    pub fn is_module(&self, path: &str) -> bool {
        path.is_empty() || self.children.contains_key(path)
    }

    /// Bytes of every module ([`compute_module_sizes`] over this skeleton). Modules without tensors are
    /// absent (size 0).
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
        self.tensor_index.contains_key(path)
    }

    /// The direct submodules of `module`, in registration order.
    pub fn children(&self, module: &str) -> Vec<String> {
        self.children.get(module).cloned().unwrap_or_default()
    }

    /// The tensors held directly by `module` (not by its submodules), in registration order: (name, is
    /// buffer). Tied aliases are left out, as PyTorch's `named_parameters` leaves them out.
    pub fn direct_tensors(&self, module: &str) -> Vec<(String, bool)> {
        self.direct
            .get(module)
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let i = *self.tensor_index.get(n)?;
                Some((n.clone(), self.tensors[i].1.buffer))
            })
            .collect()
    }

    /// True when `path` is a module with submodules (a tensor or a leaf module has none).
    pub(crate) fn has_children(&self, path: &str) -> bool {
        !self.is_tensor(path) && self.children.get(path).is_some_and(|c| !c.is_empty())
    }

    /// Every state-dict name (tensors and tied aliases): module by module, depth first, each module's
    /// parameters then its persistent buffers (PyTorch's `state_dict` order).
    pub fn state_dict_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for module in self.named_modules() {
            let direct = self.direct.get(&module).map(Vec::as_slice).unwrap_or(&[]);
            let is_buffer = |n: &String| {
                self.tensor_index
                    .get(n)
                    .is_some_and(|i| self.tensors[*i].1.buffer)
            };
            out.extend(direct.iter().filter(|n| !is_buffer(n)).cloned());
            out.extend(
                direct
                    .iter()
                    .filter(|n| is_buffer(n) && !self.non_persistent.contains(*n))
                    .cloned(),
            );
        }
        out
    }

    /// Module names in the order Accelerate's `compute_module_sizes` inserts them: the prefixes of every
    /// parameter (depth first, tied aliases left out), then of every buffer.
    pub(crate) fn module_size_order(&self) -> Vec<String> {
        let modules = self.named_modules();
        let mut seen: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for buffers in [false, true] {
            for module in &modules {
                for (name, is_buffer) in self.direct_tensors(module) {
                    if is_buffer != buffers {
                        continue;
                    }
                    let parts: Vec<&str> = name.split('.').collect();
                    for i in 0..=parts.len() {
                        let prefix = parts[..i].join(".");
                        if seen.insert(prefix.clone()) {
                            out.push(prefix);
                        }
                    }
                }
            }
        }
        out
    }
}

/// One parent's children in registration order, from two partial orders: `listed` (declared by the
/// caller, which wins) and `from_names` (where tensor names first mention them). A child only the names
/// mention goes right before the next listed child that the names mention after it, else at the end.
fn merge_children(listed: &[String], from_names: &[String]) -> Vec<String> {
    let in_listed: HashSet<&String> = listed.iter().collect();
    let mut next_listed: Vec<Option<&String>> = vec![None; from_names.len()];
    let mut next = None;
    for (i, name) in from_names.iter().enumerate().rev() {
        next_listed[i] = next;
        if in_listed.contains(name) {
            next = Some(name);
        }
    }
    let mut out = listed.to_vec();
    for (i, child) in from_names.iter().enumerate() {
        if in_listed.contains(child) {
            continue;
        }
        match next_listed[i].and_then(|y| out.iter().position(|n| n == y)) {
            Some(at) => out.insert(at, child.clone()),
            None => out.push(child.clone()),
        }
    }
    out
}

/// The registration order of every module (root excluded, depth first) when the caller declares some
/// modules in order (`listed`) and the rest are only known from tensor names (`names`, in their order).
/// Used for var stores and JSON descriptions, which carry no module order of their own; see
/// [`merge_children`] for how the two are merged.
pub(crate) fn merged_module_order(listed: &[String], names: &[String]) -> Vec<String> {
    fn collect<'a>(paths: impl Iterator<Item = &'a str>) -> HashMap<String, Vec<String>> {
        let mut children: HashMap<String, Vec<String>> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        for path in paths.filter(|p| !p.is_empty()) {
            let parts: Vec<&str> = path.split('.').collect();
            for i in 1..=parts.len() {
                let module = parts[..i].join(".");
                if seen.insert(module.clone()) {
                    children
                        .entry(parent_of(&module).to_owned())
                        .or_default()
                        .push(module);
                }
            }
        }
        children
    }
    let listed_children = collect(listed.iter().map(String::as_str));
    let name_children = collect(names.iter().map(|n| parent_of(n)));
    let empty = Vec::new();
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(module) = stack.pop() {
        if !module.is_empty() {
            out.push(module.clone());
        }
        let children = merge_children(
            listed_children.get(&module).unwrap_or(&empty),
            name_children.get(&module).unwrap_or(&empty),
        );
        stack.extend(children.into_iter().rev());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn modules_without_tensors_keep_their_place() {
        let model = ModelSkeleton::new()
            .param("lin1.weight", &[4, 4], Kind::Float)
            .class("act", "ReLU")
            .param("block.0.weight", &[4, 4], Kind::Float)
            .class("block.1", "ReLU")
            .param("block.2.weight", &[4, 4], Kind::Float)
            .buffer("block.2.running", &[4], Kind::Float)
            .param("lin2.weight", &[4, 4], Kind::Float)
            .tie("lin2.weight", "lin1.weight");
        assert_eq!(
            model.named_modules(),
            strings(&[
                "", "lin1", "act", "block", "block.0", "block.1", "block.2", "lin2"
            ])
        );
        assert_eq!(
            model.children(""),
            strings(&["lin1", "act", "block", "lin2"])
        );
        assert!(model.is_module("act") && !model.has_children("act"));
        // The alias keeps its module and its state-dict place, but holds no memory.
        assert!(!model.is_tensor("lin2.weight"));
        assert_eq!(model.tensors().len(), 4);
        assert_eq!(
            model.state_dict_names(),
            strings(&[
                "lin1.weight",
                "block.0.weight",
                "block.2.weight",
                "block.2.running",
                "lin2.weight"
            ])
        );
        assert_eq!(
            model.module_size_order(),
            strings(&[
                "",
                "lin1",
                "lin1.weight",
                "block",
                "block.0",
                "block.0.weight",
                "block.2",
                "block.2.weight",
                "block.2.running"
            ])
        );
    }

    #[test]
    fn declared_order_wins_and_the_rest_fits_around_it() {
        let names = strings(&["embed.w", "layers.0.w", "layers.1.w", "norm.w", "lm_head.w"]);
        // Only some modules declared: `act` goes after `layers`, `embed` before it, `norm` at the end.
        let listed = strings(&["layers.0", "layers.1", "act"]);
        assert_eq!(
            merged_module_order(&listed, &names),
            strings(&[
                "embed", "layers", "layers.0", "layers.1", "act", "norm", "lm_head"
            ])
        );
        // Everything declared (as named_modules() lists it): that order exactly.
        let all = strings(&["lm_head", "embed", "layers", "layers.1", "layers.0", "norm"]);
        assert_eq!(merged_module_order(&all, &names), all);
        assert_eq!(
            merged_module_order(&[], &names),
            strings(&["embed", "layers", "layers.0", "layers.1", "norm", "lm_head"])
        );
    }
}
