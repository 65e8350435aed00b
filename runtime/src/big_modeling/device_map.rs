//! Device maps (Accelerate's `infer_auto_device_map`, `get_max_layer_size`, `clean_device_map`): which
//! module goes to which GPU, the CPU or the disk, filling devices in order.
//!
//! The rules, as in Accelerate: devices are tried in order (GPUs by index, then the CPU, then the disk);
//! on the "main" devices (the first GPU and the CPU) room is kept for the largest layer still to place,
//! so an offloaded layer can be brought back; a module that does not fit is split into its direct
//! parameters and children unless it is a leaf or its class is in `no_split_module_classes`; tied
//! parameters pull the modules they are tied to onto the same device; finally children sharing a device
//! collapse into their parent.

use super::skeleton::ModelSkeleton;
use std::collections::BTreeMap;
use tch::Kind;

/// Where a module goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKey {
    /// CUDA GPU by index.
    Gpu(usize),
    /// Host memory.
    Cpu,
    /// Offloaded to disk.
    Disk,
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKey::Gpu(i) => write!(f, "{i}"),
            DeviceKey::Cpu => f.write_str("cpu"),
            DeviceKey::Disk => f.write_str("disk"),
        }
    }
}

/// A device map: module (or tensor) paths to devices, in placement order.
pub type DeviceMap = Vec<(String, DeviceKey)>;

/// Settings of [`infer_auto_device_map`] (Accelerate's keyword arguments and defaults).
#[derive(Debug, Clone, Default)]
pub struct DeviceMapOptions {
    /// Bytes available per device (any order; GPUs are used first, then the CPU, then the disk).
    pub max_memory: Vec<(DeviceKey, u64)>,
    /// Classes of modules never split across devices (residual blocks).
    pub no_split_module_classes: Vec<String>,
    /// Count floating tensors at this dtype's size.
    pub dtype: Option<Kind>,
    /// Per-tensor dtypes that override `dtype`.
    pub special_dtypes: BTreeMap<String, Kind>,
    /// Keep the raw per-module map instead of collapsing children into parents (default false: collapse).
    pub keep_unclean: bool,
    /// Buffers of offloaded modules are offloaded with them (default false: they stay on the execution
    /// device, and a warning says so when they fit no GPU's remaining memory, as in Accelerate).
    pub offload_buffers: bool,
    /// When the module next in line fits on no device that is still empty, look (breadth first) for a
    /// smaller module further down the queue that does fit there, as Accelerate's `fallback_allocation`.
    pub fallback_allocation: bool,
    /// Print each placement decision, and the devices that received nothing with the memory they would
    /// have needed (Accelerate's `verbose`, and its "insufficient memory" log message).
    pub verbose: bool,
}

/// The largest unsplittable layer among `items` and the names of every layer of that size.
pub fn get_max_layer_size(
    model: &ModelSkeleton,
    items: &[String],
    sizes: &BTreeMap<String, u64>,
    no_split: &[String],
) -> (u64, Vec<String>) {
    let mut max_size = 0;
    let mut names = Vec::new();
    let mut queue: Vec<String> = items.to_vec();
    while !queue.is_empty() {
        let name = queue.remove(0);
        let unsplittable = !model.has_children(&name)
            || model
                .class_of(&name)
                .is_some_and(|c| no_split.iter().any(|n| n == c));
        if unsplittable {
            let size = sizes.get(&name).copied().unwrap_or(0);
            if size > max_size {
                max_size = size;
                names = vec![name];
            } else if size == max_size {
                names.push(name);
            }
        } else {
            let mut children = model.children(&name);
            children.extend(queue);
            queue = children;
        }
    }
    (max_size, names)
}

/// Collapses children that all share a device into their parent, recursively (Accelerate's
/// `clean_device_map`). As in Accelerate, a collapsed parent takes the place of its children at the END of
/// the map (Python deletes the keys and sets the parent in an ordered dict). Accelerate then visits the
/// children in the order of a Python set, so when several siblings collapse their order changes with
/// `PYTHONHASHSEED`; here they are visited in map order, so the map is always the same (identical to
/// Accelerate's whenever at most one module collapses, and equal as a dict always).
pub fn clean_device_map(map: &mut DeviceMap, module: &str) {
    let prefix = if module.is_empty() {
        String::new()
    } else {
        format!("{module}.")
    };
    let under = |k: &str| k.starts_with(&prefix);
    let values: Vec<DeviceKey> = map
        .iter()
        .filter(|(k, _)| under(k))
        .map(|(_, v)| *v)
        .collect();
    if values.len() > 1 && values.iter().all(|v| *v == values[0]) {
        map.retain(|(k, _)| !under(k));
        match map.iter_mut().find(|(k, _)| k == module) {
            Some(entry) => entry.1 = values[0],
            None => map.push((module.to_owned(), values[0])),
        }
    }
    let depth = if module.is_empty() {
        1
    } else {
        module.split('.').count() + 1
    };
    let mut children: Vec<String> = Vec::new();
    for (k, _) in map.iter() {
        if under(k) && k.len() > module.len() {
            let child = k.split('.').take(depth).collect::<Vec<_>>().join(".");
            if !children.contains(&child) {
                children.push(child);
            }
        }
    }
    for child in children {
        clean_device_map(map, &child);
    }
}

fn is_in(name: &str, param: &str) -> bool {
    format!("{param}.").starts_with(&format!("{name}."))
}

/// Accelerate's `infer_auto_device_map` over a skeleton.
pub fn infer_auto_device_map(model: &ModelSkeleton, opts: &DeviceMapOptions) -> DeviceMap {
    let mut placement = place(model, opts);
    if let Some(warning) = buffer_warning(
        model,
        &placement.map,
        &placement.max_memory,
        &placement.used,
        opts,
    ) {
        crate::log::event!(warn, target: "hasten::big_modeling", "hasten: warning: {warning}");
    }
    if opts.verbose {
        if let Some(info) = insufficient_memory_info(&placement.minimum) {
            crate::log::event!(info, target: "hasten::big_modeling", "hasten: info: {info}");
        }
    }
    if !opts.keep_unclean {
        clean_device_map(&mut placement.map, "");
    }
    placement.map
}

/// The outcome of the placement loop, before cleaning.
pub(super) struct Placement {
    pub map: DeviceMap,
    pub max_memory: Vec<(DeviceKey, u64)>,
    /// Bytes counted on each device (with the room kept for the largest layer on the ones left behind).
    pub used: BTreeMap<DeviceKey, u64>,
    /// Devices that received nothing, with what the module that did not fit would have needed.
    pub minimum: BTreeMap<DeviceKey, u64>,
}

/// The modules and tensors `name` splits into: its direct parameters, then its children.
fn split(model: &ModelSkeleton, name: &str) -> Vec<String> {
    let mut parts: Vec<String> = model
        .direct_tensors(name)
        .into_iter()
        .filter(|(_, b)| !b)
        .map(|(n, _)| n)
        .collect();
    parts.extend(model.children(name));
    parts
}

fn unsplittable(model: &ModelSkeleton, name: &str, no_split: &[String]) -> bool {
    !model.has_children(name)
        || model
            .class_of(name)
            .is_some_and(|c| no_split.iter().any(|n| n == c))
}

/// Parameters outside `name` tied to parameters inside it.
fn tied_outside(tied: &[Vec<String>], name: &str) -> Vec<String> {
    tied.iter()
        .filter(|g| g.iter().any(|p| is_in(name, p)) && !g.iter().all(|p| is_in(name, p)))
        .flat_map(|g| g.iter().filter(|p| !is_in(name, p)).cloned())
        .collect()
}

/// The size of `name` together with the queued modules holding parameters tied to it, and those modules.
fn size_with_ties(
    sizes: &BTreeMap<String, u64>,
    tied: &[Vec<String>],
    name: &str,
    queue: &[String],
) -> (u64, Vec<String>) {
    let size_of = |n: &str| sizes.get(n).copied().unwrap_or(0);
    let mut total = size_of(name);
    let mut modules = Vec::new();
    for p in tied_outside(tied, name) {
        if let Some(owner) = queue.iter().find(|n| p.starts_with(&format!("{n}."))) {
            total += size_of(owner).saturating_sub(size_of(&p));
            modules.push(owner.clone());
        }
    }
    (total, modules)
}

/// Accelerate's `fallback_allocate`: the first module (searching breadth first, splitting what may be
/// split) that fits in `limit` bytes, and the queue without it (its ancestors replaced by their parts).
fn fallback_allocate(
    model: &ModelSkeleton,
    sizes: &BTreeMap<String, u64>,
    tied: &[Vec<String>],
    no_split: &[String],
    queue: &[String],
    limit: i128,
) -> Option<(String, Vec<String>)> {
    let mut search: Vec<String> = queue.to_vec();
    let mut found = None;
    while !search.is_empty() {
        let name = search.remove(0);
        let (size, _) = size_with_ties(sizes, tied, &name, &search);
        if i128::from(size) <= limit {
            found = Some(name);
            break;
        }
        if !unsplittable(model, &name, no_split) {
            let mut next = split(model, &name);
            next.extend(search);
            search = next;
        }
    }
    let name = found?;
    let mut rest = queue.to_vec();
    for (i, _) in name.match_indices('.') {
        let parent = &name[..i];
        if let Some(at) = rest.iter().position(|n| n == parent) {
            rest.splice(at..=at, split(model, parent));
        }
    }
    let at = rest.iter().position(|n| *n == name)?;
    rest.remove(at);
    Some((name, rest))
}

/// Accelerate's message for devices that received no module.
pub(super) fn insufficient_memory_info(minimum: &BTreeMap<DeviceKey, u64>) -> Option<String> {
    (!minimum.is_empty()).then(|| {
        let devices: Vec<String> = minimum
            .iter()
            .map(|(d, m)| format!("  - {d}: {m} bytes required"))
            .collect();
        format!(
            "Based on the current allocation process, no modules could be assigned to the following \
             devices due to insufficient memory:\n{}\nThese minimum requirements are specific to this \
             allocation attempt and may vary. Consider increasing the available memory for these devices \
             to at least the specified minimum, or adjusting the model config.",
            devices.join("\n")
        )
    })
}

/// The placement loop of Accelerate's `infer_auto_device_map`.
pub(super) fn place(model: &ModelSkeleton, opts: &DeviceMapOptions) -> Placement {
    let mut max_memory: Vec<(DeviceKey, u64)> = opts.max_memory.clone();
    max_memory.sort_by_key(|(d, _)| *d);
    let mut devices: Vec<DeviceKey> = max_memory.iter().map(|(d, _)| *d).collect();
    if !devices.contains(&DeviceKey::Disk) {
        devices.push(DeviceKey::Disk);
    }
    let capacity = |d: DeviceKey| max_memory.iter().find(|(k, _)| *k == d).map(|(_, m)| *m);
    let main_devices: Vec<DeviceKey> = match devices.iter().find(|d| matches!(d, DeviceKey::Gpu(_)))
    {
        Some(g) => vec![*g, DeviceKey::Cpu],
        None => vec![DeviceKey::Cpu],
    };
    let no_split = &opts.no_split_module_classes;
    let sizes = model.module_sizes(opts.dtype, &opts.special_dtypes);
    let size_of = |n: &str| sizes.get(n).copied().unwrap_or(0);
    let tied = model.tied_parameters();
    let say = |line: String| {
        if opts.verbose {
            eprintln!("{line}");
        }
    };

    // Direct parameters of the root, its children, then its direct buffers.
    let root_tensors = model.direct_tensors("");
    let mut queue: Vec<String> = root_tensors
        .iter()
        .filter(|(_, b)| !b)
        .map(|(n, _)| n.clone())
        .collect();
    queue.extend(model.children(""));
    queue.extend(
        root_tensors
            .iter()
            .filter(|(_, b)| *b)
            .map(|(n, _)| n.clone()),
    );

    // get_max_layer_size is given modules only once placement starts (tensors are never the largest layer
    // then), as in Accelerate.
    let modules_only = |q: &[String]| -> Vec<String> {
        q.iter().filter(|n| !model.is_tensor(n)).cloned().collect()
    };
    let mut map: DeviceMap = Vec::new();
    let mut current = 0usize;
    let mut used: BTreeMap<DeviceKey, u64> = devices.iter().map(|d| (*d, 0)).collect();
    let mut minimum: BTreeMap<DeviceKey, u64> = BTreeMap::new();
    let (mut max_layer, mut max_names) = get_max_layer_size(model, &queue, &sizes, no_split);

    while !queue.is_empty() {
        let name = queue.remove(0);
        say(format!("Treating module {name}."));
        max_names.retain(|n| n != &name && !n.starts_with(&format!("{name}.")));
        if max_names.is_empty() {
            (max_layer, max_names) =
                get_max_layer_size(model, &modules_only(&queue), &sizes, no_split);
        }
        let module_size = size_of(&name);
        let has_ties = !tied_outside(tied, &name).is_empty();
        let device = devices[current.min(devices.len() - 1)];
        // Signed: below the largest layer a main device's room is negative, and even a module of size 0
        // (one without tensors) then moves on, as in Accelerate.
        let mut current_max: Option<i128> = capacity(device)
            .filter(|_| device != DeviceKey::Disk)
            .map(i128::from);
        let mut reserved = 0;
        if main_devices.contains(&device) {
            current_max = current_max.map(|m| m - i128::from(max_layer));
            reserved = max_layer;
        }
        let (size_with_ties, tied_modules) = size_with_ties(&sizes, tied, &name, &queue);
        let used_here = used[&device];
        let fits = |size: u64| current_max.is_none_or(|m| i128::from(used_here + size) <= m);
        if fits(size_with_ties) {
            let available = current_max
                .map(|m| format!(" (available={})", m - i128::from(used_here)))
                .unwrap_or_default();
            say(format!(
                "Putting {name} (size={size_with_ties}){available} on {device}."
            ));
            *used.entry(device).or_insert(0) += size_with_ties;
            map.push((name.clone(), device));
            // Each tied module right after the module it is tied to (Python assigns the dict key: one
            // already in the map keeps its place and takes the new device).
            for t in &tied_modules {
                queue.retain(|n| n != t);
                match map.iter_mut().find(|(k, _)| k == t) {
                    Some(entry) => entry.1 = device,
                    None => map.push((t.clone(), device)),
                }
            }
            continue;
        }
        let max_here = current_max.unwrap_or(i128::MAX);
        let used_signed = i128::from(used_here);
        if has_ties && used_signed + i128::from(module_size) <= max_here {
            // Try splitting a tied module so that only the tied part comes along.
            let splittable = tied_modules
                .iter()
                .find(|t| !unsplittable(model, t, no_split));
            if let Some(t) = splittable.cloned() {
                say(format!("Splitting {t}."));
                let index = queue.iter().position(|n| *n == t).unwrap_or(0);
                let mut next = vec![name.clone()];
                next.extend(queue[..index].iter().cloned());
                next.extend(split(model, &t));
                next.extend(queue[index + 1..].iter().cloned());
                queue = next;
                (max_layer, max_names) =
                    get_max_layer_size(model, &modules_only(&queue), &sizes, no_split);
                continue;
            }
        }
        if used_signed + i128::from(module_size) >= max_here {
            say(format!(
                "Not enough space on {device} to put {name} (space available {}, module size {module_size}).",
                max_here - used_signed
            ));
            if !unsplittable(model, &name, no_split) {
                say(format!("Splitting {name}."));
                let mut parts = split(model, &name);
                parts.extend(queue);
                queue = parts;
                (max_layer, max_names) =
                    get_max_layer_size(model, &modules_only(&queue), &sizes, no_split);
                continue;
            }
            say("This module cannot be split, going to the next device.".into());
        }
        if used_here == 0 && opts.fallback_allocation && device != DeviceKey::Disk {
            // Room for this device's own largest need, whichever is larger (Accelerate's rule).
            let limit = i128::from(capacity(device).unwrap_or(0))
                - i128::from(max_layer.max(size_with_ties));
            if let Some((found, rest)) =
                fallback_allocate(model, &sizes, tied, no_split, &queue, limit)
            {
                say(format!("Fallback allocation: trying {found} on {device}."));
                queue = vec![found, name];
                queue.extend(rest);
                continue;
            }
        }
        if used_here == 0 {
            minimum.insert(device, size_with_ties + reserved);
        }
        // Next device; keep the reserved room counted on this one.
        *used.entry(device).or_insert(0) += reserved;
        current += 1;
        queue.insert(0, name);
    }
    Placement {
        map,
        max_memory,
        used,
        minimum,
    }
}

/// Accelerate's warning when the buffers of the modules placed on the CPU or the disk (which stay on
/// the execution device unless `offload_buffers`) fit in no GPU's remaining memory.
pub(super) fn buffer_warning(
    model: &ModelSkeleton,
    map: &DeviceMap,
    max_memory: &[(DeviceKey, u64)],
    used: &BTreeMap<DeviceKey, u64>,
    opts: &DeviceMapOptions,
) -> Option<String> {
    if opts.offload_buffers {
        return None;
    }
    let buffers = super::sizes::compute_module_sizes(
        model.tensors().iter().map(|(n, m)| (n.as_str(), m)),
        opts.dtype,
        &opts.special_dtypes,
        true,
    );
    let offloaded: u64 = map
        .iter()
        .filter(|(_, d)| matches!(d, DeviceKey::Cpu | DeviceKey::Disk))
        .map(|(m, _)| buffers.get(m).copied().unwrap_or(0))
        .sum();
    let gpus: Vec<&(DeviceKey, u64)> = max_memory
        .iter()
        .filter(|(d, _)| matches!(d, DeviceKey::Gpu(_)))
        .collect();
    let fits = gpus
        .iter()
        .any(|(d, m)| *m >= offloaded + used.get(d).copied().unwrap_or(0));
    (offloaded > 0 && !gpus.is_empty() && !fits).then(|| {
        format!(
            "Current model requires {offloaded} bytes of buffer for offloaded layers, which seems does \
             not fit any GPU's remaining memory. If you are experiencing a OOM later, please consider \
             using offload_buffers=True."
        )
    })
}

#[cfg(test)]
mod tests;
