//! How much memory each device offers a model: read from the devices, given as strings, or balanced
//! across GPUs (Accelerate's `get_max_memory` and `get_balanced_memory`).

use super::device_map::DeviceKey;
use super::sizes::convert_file_size_to_int;
use super::skeleton::ModelSkeleton;
use crate::{Error, Result};
use std::collections::BTreeMap;
use tch::Kind;

/// Memory per device, GPUs first (by index), then the CPU, then the disk.
pub type MaxMemory = Vec<(DeviceKey, u64)>;

/// Parses a device name as Accelerate writes it: `0`, `cuda:1`, `cpu`, `disk`.
pub fn parse_device_key(key: &str) -> Result<DeviceKey> {
    let k = key.trim().to_ascii_lowercase();
    match k.as_str() {
        "cpu" => Ok(DeviceKey::Cpu),
        "disk" => Ok(DeviceKey::Disk),
        _ => k
            .strip_prefix("cuda:")
            .unwrap_or(&k)
            .parse::<usize>()
            .map(DeviceKey::Gpu)
            .map_err(|_| Error::InvalidValue {
                name: "max_memory".into(),
                detail: format!(
                    "unknown device {key:?}: use a GPU index (0, cuda:1), \"cpu\" or \"disk\""
                ),
            }),
    }
}

/// Parses `max_memory` given as strings (`[("0", "10GiB"), ("cpu", "30GB")]`), sorted GPUs first.
pub fn parse_max_memory(entries: &[(&str, &str)]) -> Result<MaxMemory> {
    let mut out: MaxMemory = entries
        .iter()
        .map(|(k, v)| Ok((parse_device_key(k)?, convert_file_size_to_int(v)?)))
        .collect::<Result<_>>()?;
    out.sort_by_key(|(d, _)| *d);
    Ok(out)
}

/// The memory available right now: every GPU's free memory and the host's available memory (Accelerate's
/// `get_max_memory()` with no argument). Reading GPU memory initialises CUDA.
pub fn get_max_memory() -> Result<MaxMemory> {
    let mut out: MaxMemory = crate::cuda_devices()?
        .into_iter()
        .map(|g| (DeviceKey::Gpu(g.index), g.free_memory as u64))
        .collect();
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| Error::io("reading", "/proc/meminfo", e))?;
    let available = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0);
    out.push((DeviceKey::Cpu, available));
    Ok(out)
}

/// Leaves of a module-size map: names with no child in it.
fn leaves(sizes: &BTreeMap<String, u64>) -> Vec<String> {
    let mut children: BTreeMap<&str, usize> = BTreeMap::new();
    for name in sizes.keys() {
        if let Some((parent, _)) = name.rsplit_once('.') {
            *children.entry(parent).or_default() += 1;
        }
    }
    sizes
        .keys()
        .filter(|n| !n.is_empty() && !children.contains_key(n.as_str()))
        .cloned()
        .collect()
}

/// A `max_memory` that spreads the model evenly over the GPUs (Accelerate's `get_balanced_memory`): each
/// GPU but the last gets its share plus a buffer for the largest no-split block (or 1.25 × the mean
/// final module); the last keeps all its memory; with `low_zero` GPU 0 gets as little as possible. With
/// `max_memory: None` the devices' free memory is read, and a single GPU keeps 10% spare.
pub fn get_balanced_memory(
    model: &ModelSkeleton,
    max_memory: Option<MaxMemory>,
    no_split_module_classes: &[String],
    dtype: Option<Kind>,
    special_dtypes: &BTreeMap<String, Kind>,
    low_zero: bool,
) -> Result<MaxMemory> {
    let user_set = max_memory.is_some();
    let mut mem = match max_memory {
        Some(mut m) => {
            m.sort_by_key(|(d, _)| *d);
            m
        }
        None => get_max_memory()?,
    };
    let gpu_ids: Vec<usize> = mem
        .iter()
        .filter_map(|(d, m)| match d {
            DeviceKey::Gpu(i) if *m > 0 => Some(*i),
            _ => None,
        })
        .collect();
    let num_devices = gpu_ids.len();
    if num_devices == 0 {
        return Ok(mem);
    }
    let mut low_zero = low_zero;
    if num_devices == 1 {
        low_zero = false;
        if !user_set {
            if let Some((_, m)) = mem.iter_mut().find(|(d, _)| matches!(d, DeviceKey::Gpu(_))) {
                *m = (*m as f64 * 0.9) as u64;
            }
        }
    }
    let sizes = model.module_sizes(dtype, special_dtypes);
    let total = sizes.get("").copied().unwrap_or(0);
    let mut per_gpu = total
        / (if low_zero {
            num_devices - 1
        } else {
            num_devices
        })
        .max(1) as u64;

    // The largest no-split block, over the first module of each class in the order Accelerate's
    // module_sizes holds them: the prefixes of all parameters in registration order, then of the
    // buffers. So the first registered block with parameters sets its class's size (not the largest
    // block, nor the first by name); a module without tensors is never met.
    let mut no_split_sizes: BTreeMap<&str, u64> = BTreeMap::new();
    for name in model.module_size_order().into_iter().skip(1) {
        if let Some(class) = model
            .class_of(&name)
            .filter(|c| no_split_module_classes.iter().any(|n| n == c))
        {
            no_split_sizes
                .entry(class)
                .or_insert_with(|| sizes.get(&name).copied().unwrap_or(0));
        }
    }
    let block = no_split_sizes.values().copied().max().unwrap_or(0);
    // Mean size of the final modules: leaves once the tensors (the first leaves) are removed.
    let tensor_leaves = leaves(&sizes);
    let modules: BTreeMap<String, u64> = sizes
        .iter()
        .filter(|(n, _)| !tensor_leaves.contains(n))
        .map(|(n, s)| (n.clone(), *s))
        .collect();
    let final_modules = leaves(&modules);
    let mean = if final_modules.is_empty() {
        0
    } else {
        final_modules.iter().map(|n| modules[n]).sum::<u64>() / final_modules.len() as u64
    };
    per_gpu += (1.25 * block.max(mean) as f64) as u64;

    let gpu0 = mem
        .iter()
        .find(|(d, _)| *d == DeviceKey::Gpu(0))
        .map(|(_, m)| *m)
        .unwrap_or(0);
    for (i, idx) in gpu_ids.iter().enumerate() {
        if i + 1 == gpu_ids.len() {
            break; // the last GPU keeps all its memory, in case the buffer is not enough
        }
        if let Some((_, m)) = mem.iter_mut().find(|(d, _)| *d == DeviceKey::Gpu(*idx)) {
            *m = (*m).min(if low_zero && *idx == 0 { gpu0 } else { per_gpu });
        }
    }
    if low_zero {
        // GPUs 1..n must all be there, as Accelerate indexes them (a KeyError there).
        let others: u64 = (1..num_devices)
            .map(|i| {
                mem.iter()
                    .find(|(d, _)| *d == DeviceKey::Gpu(i))
                    .map(|(_, m)| *m)
                    .ok_or_else(|| Error::InvalidValue {
                        name: "max_memory".into(),
                        detail: format!(
                            "low_zero balances GPUs 0 to {} by index, but GPU {i} is not in max_memory",
                            num_devices - 1
                        ),
                    })
            })
            .sum::<Result<u64>>()?;
        let min_zero = total.saturating_sub(others);
        if let Some((_, m)) = mem.iter_mut().find(|(d, _)| *d == DeviceKey::Gpu(0)) {
            *m = (*m).min(min_zero);
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_for_test() -> ModelSkeleton {
        ModelSkeleton::new()
            .param("linear1.weight", &[4, 3], Kind::Float)
            .param("linear1.bias", &[4], Kind::Float)
            .param("batchnorm.weight", &[4], Kind::Float)
            .param("batchnorm.bias", &[4], Kind::Float)
            .buffer("batchnorm.running_mean", &[4], Kind::Float)
            .buffer("batchnorm.running_var", &[4], Kind::Float)
            .buffer("batchnorm.num_batches_tracked", &[], Kind::Int64)
            .param("linear2.weight", &[5, 4], Kind::Float)
            .param("linear2.bias", &[5], Kind::Float)
    }

    fn balanced(mem: &[(&str, u64)]) -> Vec<(String, u64)> {
        let m: MaxMemory = mem
            .iter()
            .map(|(k, v)| (parse_device_key(k).unwrap(), *v))
            .collect();
        get_balanced_memory(
            &model_for_test(),
            Some(m),
            &[],
            None,
            &BTreeMap::new(),
            false,
        )
        .unwrap()
        .into_iter()
        .map(|(d, v)| (d.to_string(), v))
        .collect()
    }

    fn m(entries: &[(&str, u64)]) -> Vec<(String, u64)> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn balanced_memory_matches_accelerate() {
        assert_eq!(
            balanced(&[("0", 200), ("1", 200)]),
            m(&[("0", 200), ("1", 200)])
        );
        assert_eq!(
            balanced(&[("0", 200), ("2", 200)]),
            m(&[("0", 200), ("2", 200)])
        );
        assert_eq!(
            balanced(&[("0", 300), ("1", 300)]),
            m(&[("0", 215), ("1", 300)])
        );
        assert_eq!(
            balanced(&[("0", 300), ("1", 500)]),
            m(&[("0", 215), ("1", 500)])
        );
        assert_eq!(
            balanced(&[("0", 300), ("cpu", 1000)]),
            m(&[("0", 300), ("cpu", 1000)])
        );
        assert_eq!(
            balanced(&[("0", 0), ("1", 300), ("2", 300)]),
            m(&[("0", 0), ("1", 215), ("2", 300)])
        );
        assert_eq!(
            balanced(&[("0", 0), ("cpu", 100)]),
            m(&[("0", 0), ("cpu", 100)])
        );
    }

    /// Block(d) = two Linear(d, d); Other(d) = one. Registered zeta (Block(8), 576 bytes), alpha
    /// (Block(4), 160), mid (Block(16), 2176), other (Other(12), 624).
    fn blocks_model(s: ModelSkeleton, name: &str, d: i64, class: &str) -> ModelSkeleton {
        let mut s = s.class(name, class);
        let layers: &[&str] = if class == "Block" {
            &["fc1", "fc2"]
        } else {
            &["fc"]
        };
        for l in layers {
            s = s
                .param(&format!("{name}.{l}.weight"), &[d, d], Kind::Float)
                .param(&format!("{name}.{l}.bias"), &[d], Kind::Float);
        }
        s
    }

    fn model_m() -> ModelSkeleton {
        let s = blocks_model(ModelSkeleton::new(), "zeta", 8, "Block");
        let s = blocks_model(s, "alpha", 4, "Block");
        let s = blocks_model(s, "mid", 16, "Block");
        blocks_model(s, "other", 12, "Other")
    }

    fn balanced_for(
        model: &ModelSkeleton,
        memory: &[(&str, &str)],
        no_split: &[&str],
        dtype: Option<Kind>,
        low_zero: bool,
    ) -> Result<Vec<(String, u64)>> {
        let no_split: Vec<String> = no_split.iter().map(|c| (*c).to_owned()).collect();
        Ok(get_balanced_memory(
            model,
            Some(parse_max_memory(memory)?),
            &no_split,
            dtype,
            &BTreeMap::new(),
            low_zero,
        )?
        .into_iter()
        .map(|(d, v)| (d.to_string(), v))
        .collect())
    }

    #[test]
    fn the_no_split_buffer_comes_from_the_first_registered_block() {
        // Expected values: Accelerate 1.15.0 (tests/python/oracle/oracle_bigmodel_balanced.py), no CUDA needed.
        let model = model_m();
        assert_eq!(model.module_sizes(None, &BTreeMap::new())[""], 3536);
        let g2 = [("0", "100000"), ("1", "100000")];
        let g3 = [("0", "100000"), ("1", "100000"), ("2", "100000")];
        for (no_split, two, three) in [
            (&["Block"][..], 2488, 1898),
            (&["Block", "Other"][..], 2548, 1958),
            (&["Other"][..], 2548, 1958),
            (&["Nope"][..], 2399, 1809),
            (&[][..], 2399, 1809),
        ] {
            let b =
                |mem: &[(&str, &str)]| balanced_for(&model, mem, no_split, None, false).unwrap();
            assert_eq!(b(&g2), m(&[("0", two), ("1", 100000)]), "{no_split:?}");
            assert_eq!(
                b(&g3),
                m(&[("0", three), ("1", three), ("2", 100000)]),
                "{no_split:?}"
            );
        }
        let block =
            |mem: &[(&str, &str)], low_zero| balanced_for(&model, mem, &["Block"], None, low_zero);
        assert_eq!(
            block(
                &[("0", "100000"), ("1", "100000"), ("cpu", "1000000")],
                false
            )
            .unwrap(),
            m(&[("0", 2488), ("1", 100000), ("cpu", 1000000)])
        );
        assert_eq!(
            block(&g3, true).unwrap(),
            m(&[("0", 0), ("1", 2488), ("2", 100000)])
        );
        assert_eq!(block(&g2, true).unwrap(), m(&[("0", 0), ("1", 100000)]));
        // Accelerate: KeyError: 1.
        let err = block(&[("0", "100000"), ("2", "100000"), ("3", "100000")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("GPU 1"), "{err}");
        assert_eq!(
            balanced_for(&model, &[("0", "0"), ("cpu", "100000")], &[], None, false).unwrap(),
            m(&[("0", 0), ("cpu", 100000)])
        );
        assert_eq!(
            block(&[("0", "100000"), ("cpu", "100000")], false).unwrap(),
            m(&[("0", 100000), ("cpu", 100000)])
        );
        assert_eq!(
            block(&[("0", "0"), ("1", "100000"), ("2", "100000")], false).unwrap(),
            m(&[("0", 0), ("1", 2488), ("2", 100000)])
        );
        assert_eq!(
            block(&[("0", "100000"), ("2", "100000")], false).unwrap(),
            m(&[("0", 2488), ("2", 100000)])
        );
        assert_eq!(
            block(&[("0", "10KB"), ("1", "1MiB"), ("cpu", "1GB")], false).unwrap(),
            m(&[("0", 2488), ("1", 1048576), ("cpu", 1000000000)])
        );
        assert_eq!(
            block(&[("0", "1000"), ("1", "100000")], false).unwrap(),
            m(&[("0", 1000), ("1", 100000)])
        );
        assert_eq!(
            balanced_for(&model, &g2, &["Block"], Some(Kind::Half), false).unwrap(),
            m(&[("0", 1244), ("1", 100000)])
        );

        // A "Block" holding only a buffer, registered first, comes after every block with parameters in
        // Accelerate's module_sizes ('', small, big, buf): the block taken is `small`.
        let mb =
            ModelSkeleton::new()
                .class("buf", "Block")
                .buffer("buf.table", &[1000], Kind::Float);
        let mb = blocks_model(mb, "small", 4, "Block");
        let mb = blocks_model(mb, "big", 16, "Block");
        assert_eq!(
            balanced_for(&mb, &g2, &["Block"], None, false).unwrap(),
            m(&[("0", 4751), ("1", 100000)])
        );
        assert_eq!(
            balanced_for(&mb, &g3, &["Block"], None, false).unwrap(),
            m(&[("0", 3695), ("1", 3695), ("2", 100000)])
        );
    }

    #[test]
    fn maps_from_balanced_memory() {
        use crate::big_modeling::DeviceMapOptions;
        use crate::infer_auto_device_map;
        let model = model_m();
        let no_split = vec!["Block".to_owned()];
        let map_for = |memory: &[(&str, &str)]| {
            let max_memory = get_balanced_memory(
                &model,
                Some(parse_max_memory(memory).unwrap()),
                &no_split,
                None,
                &BTreeMap::new(),
                false,
            )
            .unwrap();
            let map = infer_auto_device_map(
                &model,
                &DeviceMapOptions {
                    max_memory: max_memory.clone(),
                    no_split_module_classes: no_split.clone(),
                    ..Default::default()
                },
            );
            (
                max_memory,
                map.into_iter()
                    .map(|(k, v)| (k, v.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        // GPU 0's 2488 less the room kept for `mid` (2176) cannot take `zeta`: all on GPU 1.
        let (_, map) = map_for(&[("0", "100000"), ("1", "100000")]);
        assert_eq!(map, vec![(String::new(), "1".to_owned())]);
        let (memory, map) = map_for(&[("0", "3000"), ("1", "3000"), ("cpu", "100000")]);
        assert_eq!(
            memory,
            vec![
                (DeviceKey::Gpu(0), 2488),
                (DeviceKey::Gpu(1), 3000),
                (DeviceKey::Cpu, 100000)
            ]
        );
        let want: Vec<(String, String)> = [
            ("zeta", "1"),
            ("alpha", "1"),
            ("mid", "1"),
            ("other.fc", "cpu"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(map, want);
    }

    #[test]
    fn max_memory_strings() {
        let parsed = parse_max_memory(&[
            ("cpu", "2GiB"),
            ("cuda:1", "100MB"),
            ("0", "1.5GB"),
            ("disk", "1KiB"),
        ])
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                (DeviceKey::Gpu(0), 1_500_000_000),
                (DeviceKey::Gpu(1), 100_000_000),
                (DeviceKey::Cpu, 2 << 30),
                (DeviceKey::Disk, 1024)
            ]
        );
        assert!(
            parse_max_memory(&[("tpu", "1GB")])
                .unwrap_err()
                .to_string()
                .contains("\"tpu\"")
        );
        assert!(
            parse_max_memory(&[("0", "lots")])
                .unwrap_err()
                .to_string()
                .contains("\"lots\"")
        );
    }

    #[test]
    fn real_memory_has_the_host() {
        let mem = get_max_memory().unwrap();
        let cpu = mem
            .iter()
            .find(|(d, _)| *d == DeviceKey::Cpu)
            .map(|(_, m)| *m)
            .unwrap();
        assert!(cpu > 0);
    }
}
