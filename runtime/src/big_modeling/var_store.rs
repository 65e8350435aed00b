//! What big-model code needs to know about a `tch` var store that PyTorch's module tree would tell it:
//! which variables are parameters, which are tied, and (from the caller) the modules and their order.
//!
//! A `VarStore` keeps neither registration order nor modules, only named variables and the list of
//! trainable ones. So: parameters are the trainable variables (whatever `requires_grad` says after a
//! `freeze`), the other variables are buffers; tied parameters are variables that are the same tensor; and
//! modules come from the caller's `(path, class)` list, whose order is the registration order.

use super::skeleton::{ModelSkeleton, merged_module_order, parent_of};
use crate::{Error, Result};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use tch::{Tensor, nn::VarStore};

/// Orders names as a model usually registers them: numeric path segments compare as numbers, so
/// `layers.2` comes before `layers.10`.
pub(super) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(i), Ok(j)) => i.cmp(&j),
                    _ => x.cmp(y),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Two handles on the same variable: the same storage, offset, shape and strides (a tensor and its
/// `shallow_clone`), which is what Python's `param is other` amounts to here. A view that starts at the
/// same address with another shape is a different parameter.
fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.data_ptr() == b.data_ptr() && a.numel() > 0 && a.is_set_to(b)
}

/// The names of the parameters (trainable variables) of `vs`; every other variable is a buffer.
pub(super) fn parameter_names(vs: &VarStore) -> HashSet<String> {
    let trainable: Vec<Tensor> = {
        let variables = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
        variables
            .trainable_variables
            .iter()
            .map(|v| v.tensor.shallow_clone())
            .collect()
    };
    let mut by_address: HashMap<usize, Vec<&Tensor>> = HashMap::new();
    for t in &trainable {
        by_address.entry(t.data_ptr() as usize).or_default().push(t);
    }
    vs.variables()
        .into_iter()
        .filter(|(_, t)| {
            by_address
                .get(&(t.data_ptr() as usize))
                .is_some_and(|c| c.iter().any(|p| p.is_set_to(t)))
        })
        .map(|(name, _)| name)
        .collect()
}

/// Groups of parameter names of `vs` that are the same tensor (tied weights, e.g. an embedding reused as
/// the output layer), Accelerate's `find_tied_parameters`: buffers are not looked at, and the names of a
/// group are sorted as plain strings (`layers.10.weight` before `layers.2.weight`), as Python's `sorted`
/// does. Accelerate's order of the groups follows a Python set (it changes with `PYTHONHASHSEED`); here
/// the groups are sorted, so the answer is always the same.
pub fn find_tied_parameters(vs: &VarStore) -> Vec<Vec<String>> {
    let parameters = parameter_names(vs);
    let mut by_address: HashMap<usize, Vec<(String, Tensor)>> = HashMap::new();
    for (name, tensor) in vs.variables() {
        if parameters.contains(&name) && tensor.numel() > 0 {
            by_address
                .entry(tensor.data_ptr() as usize)
                .or_default()
                .push((name, tensor));
        }
    }
    let mut groups: Vec<Vec<String>> = Vec::new();
    for (_, mut candidates) in by_address {
        while let Some((name, tensor)) = candidates.pop() {
            let mut group = vec![name];
            candidates.retain(|(other, t)| {
                let same = same_tensor(&tensor, t);
                if same {
                    group.push(other.clone());
                }
                !same
            });
            if group.len() > 1 {
                group.sort();
                groups.push(group);
            }
        }
    }
    groups.sort();
    groups
}

/// Makes every name of each group share one tensor again (Accelerate's `retie_parameters`): the first
/// name, in group order, whose variable holds real values (not a shape-only placeholder, Accelerate's
/// "not on the meta device"). A group with placeholders only is left as it is.
pub fn retie_parameters(vs: &VarStore, groups: &[Vec<String>]) -> Result<()> {
    let mut variables = vs.variables();
    for group in groups {
        for name in group {
            if !variables.contains_key(name) {
                return Err(Error::InvalidValue {
                    name: "tied parameters".into(),
                    detail: format!("the model has no variable {name}"),
                });
            }
        }
        let Some(original) = group
            .iter()
            .map(|n| &variables[n])
            .find(|t| !crate::layers::is_empty_placeholder(t))
            .map(Tensor::shallow_clone)
        else {
            continue;
        };
        for name in group {
            let var = variables.get_mut(name).expect("checked above");
            if same_tensor(var, &original) {
                continue;
            }
            let _guard = tch::no_grad_guard();
            var.f_set_data(&original)
                .map_err(|e| Error::torch("retie_parameters", e))?;
        }
    }
    Ok(())
}

impl ModelSkeleton {
    /// The skeleton of a `tch` model: every variable of `vs` (trainable ones are parameters, the others
    /// buffers; variables that are the same tensor are tied), with `modules` listing `(path, class)` pairs
    /// in registration order: the classes `no_split_module_classes` refers to, and any module that holds
    /// no tensor (`("act", "ReLU")`) or only tied aliases, which device maps then list as Accelerate does.
    ///
    /// tch keeps no registration order, so the listed modules keep the list's order; a module only the
    /// variable names mention goes before the next listed sibling named after it (names sorted with
    /// numbers compared as numbers), else after its listed siblings. Within a module, tensors are in that
    /// name order, parameters before buffers. Of a tied group, the first name in that order (module order
    /// first) holds the memory, as the first-registered name does in PyTorch; the others are aliases.
    pub fn from_var_store(vs: &VarStore, modules: &[(&str, &str)]) -> Self {
        let variables = vs.variables();
        let parameters = parameter_names(vs);
        let tied = find_tied_parameters(vs);
        let mut names: Vec<&String> = variables.keys().collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        let listed: Vec<String> = modules
            .iter()
            .filter(|(p, _)| !variables.contains_key(*p))
            .map(|(p, _)| (*p).to_owned())
            .collect();
        let owned: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
        let order = merged_module_order(&listed, &owned);
        let mut direct: HashMap<&str, Vec<&String>> = HashMap::new();
        for name in &names {
            direct.entry(parent_of(name)).or_default().push(name);
        }
        // State-dict order: module by module, parameters then buffers.
        let mut state_dict: Vec<&String> = Vec::new();
        for module in std::iter::once("").chain(order.iter().map(String::as_str)) {
            let own = direct.get(module).map(Vec::as_slice).unwrap_or(&[]);
            state_dict.extend(own.iter().filter(|n| parameters.contains(**n)));
            state_dict.extend(own.iter().filter(|n| !parameters.contains(**n)));
        }
        let position: HashMap<&String, usize> = state_dict
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i))
            .collect();
        let holders: Vec<(&String, &Vec<String>)> = tied
            .iter()
            .filter_map(|g| g.iter().min_by_key(|n| position.get(n)).map(|h| (h, g)))
            .collect();
        let aliases: HashSet<&String> = holders
            .iter()
            .flat_map(|(holder, group)| group.iter().filter(move |n| n != holder))
            .collect();

        let mut skeleton = ModelSkeleton::new();
        for module in &order {
            skeleton.register_module(module);
        }
        for name in state_dict {
            if aliases.contains(name) {
                skeleton.register_alias(name);
                continue;
            }
            let tensor = &variables[name];
            skeleton = if parameters.contains(name) {
                skeleton.param(name, &tensor.size(), tensor.kind())
            } else {
                skeleton.buffer(name, &tensor.size(), tensor.kind())
            };
        }
        for (path, class) in modules {
            skeleton = skeleton.class(path, class);
        }
        for (holder, group) in holders {
            for alias in group.iter().filter(|n| *n != holder) {
                skeleton = skeleton.tie(alias, holder);
            }
        }
        skeleton
    }
}

#[cfg(test)]
mod tests;
