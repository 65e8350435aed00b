//! Running an offloaded block: its weights come to the execution device for one forward pass and leave
//! afterwards, as Accelerate's offload hooks (`cpu_offload`, `disk_offload`) do around each block. tch has
//! no hooks, so a model's `forward` wraps each offloaded block in [`OffloadFolder::with_module_on`].

use super::offload_format::{fit_to, read_offload_index, read_offloaded};
use super::var_store::find_tied_parameters;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor, nn::VarStore};

/// An offload folder written by `load_checkpoint_in_model` (or Accelerate): `index.json` plus one `.dat`
/// per tensor. Without a folder, only CPU-offloaded weights can be brought over.
#[derive(Debug, Clone, Default)]
pub struct OffloadFolder {
    folder: Option<PathBuf>,
    index_path: PathBuf,
    index: HashMap<String, Value>,
}

/// Puts the saved tensors back when the block's forward ends, even by a panic.
struct Restore<'a> {
    saved: Vec<(&'a mut Tensor, Tensor)>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _guard = tch::no_grad_guard();
        for (var, data) in self.saved.drain(..) {
            // Shapes and kinds are unchanged, so set_data cannot fail here.
            let _ = var.f_set_data(&data);
        }
    }
}

impl OffloadFolder {
    /// Reads `folder/index.json` once.
    pub fn open(folder: &Path) -> Result<Self> {
        let (index_path, index) = read_offload_index(folder)?;
        Ok(Self {
            folder: Some(folder.to_owned()),
            index_path,
            index: index.into_iter().collect(),
        })
    }

    /// No folder: every weight is on the CPU (Accelerate's `cpu_offload`).
    pub fn none() -> Self {
        Self::default()
    }

    /// Runs `forward` with every tensor of `module` (a dotted prefix; `""` for all) on `device`: disk
    /// tensors are read from the folder, the others copied from where they are. Afterwards each variable
    /// holds what it held before (the one-element placeholder for disk tensors), so the copies are freed.
    pub fn with_module_on<R>(
        &self,
        vs: &VarStore,
        module: &str,
        device: Device,
        forward: impl FnOnce() -> R,
    ) -> Result<R> {
        let prefix = if module.is_empty() {
            String::new()
        } else {
            format!("{module}.")
        };
        let mut variables: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix) || name == module)
            .collect();
        if variables.is_empty() {
            return Err(Error::InvalidValue {
                name: "module".into(),
                detail: format!("the model has no tensor under {module:?}"),
            });
        }
        // A tied parameter the index does not list (a checkpoint holds one name of a tied group) is read
        // under a name tied to it.
        let mut stored_as: HashMap<String, String> = HashMap::new();
        if self.folder.is_some() && variables.iter().any(|(n, _)| !self.index.contains_key(n)) {
            for group in find_tied_parameters(vs) {
                if let Some(source) = group.iter().find(|n| self.index.contains_key(*n)) {
                    for alias in group.iter().filter(|n| !self.index.contains_key(*n)) {
                        stored_as.insert(alias.clone(), source.clone());
                    }
                }
            }
        }
        let mut restore = Restore { saved: Vec::new() };
        {
            let _guard = tch::no_grad_guard();
            for (name, var) in &mut variables {
                let stored = stored_as.get(name).unwrap_or(name);
                let value = match (&self.folder, self.index.get(stored)) {
                    // The variable's shape and kind: the placeholder of a tensor offloaded uncast
                    // under `dtype` has the cast kind, as Accelerate's meta tensor has.
                    (Some(folder), Some(entry)) => fit_to(
                        var,
                        read_offloaded(folder, stored, entry, &self.index_path, device.is_cuda())?,
                        name,
                    )?
                    .to_device(device),
                    _ => var.to_device(device),
                };
                let before = var.detach();
                var.f_set_data(&value)
                    .map_err(|e| Error::torch("bringing an offloaded weight over", e))?;
                restore.saved.push((var, before));
            }
        }
        let out = forward();
        drop(restore);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::big_modeling::{DeviceKey, LoadOptions};
    use crate::{dispatch_model, load_checkpoint_in_model};
    use tch::{Kind, nn, nn::Module};

    #[test]
    fn a_tied_head_on_disk_runs_with_the_embedding_s_weights() {
        // The checkpoint holds the embedding only (safetensors keeps one name of a tied group); the head
        // tied to it, alone in its module, still runs with the real values.
        let dir = tempfile::tempdir().unwrap();
        let values = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([6, 2]);
        Tensor::write_safetensors(
            &[("embed.weight", &values)],
            dir.path().join("m.safetensors"),
        )
        .unwrap();
        let vs = VarStore::new(Device::Cpu);
        let embed = vs
            .root()
            .sub("embed")
            .var("weight", &[6, 2], nn::Init::Const(0.0));
        let head = vs
            .root()
            .sub("lm_head")
            .add("weight", embed.shallow_clone(), true);
        let offload = dir.path().join("off");
        let map = vec![
            ("embed".to_owned(), DeviceKey::Disk),
            ("lm_head".to_owned(), DeviceKey::Disk),
        ];
        load_checkpoint_in_model(
            &vs,
            &dir.path().join("m.safetensors"),
            &LoadOptions {
                device_map: Some(map.clone()),
                offload_folder: Some(offload.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let expected = x.matmul(&values.tr());
        let folder = OffloadFolder::open(&offload).unwrap();
        let out = folder
            .with_module_on(&vs, "lm_head", Device::Cpu, || x.matmul(&head.tr()))
            .unwrap();
        assert!(out.equal(&expected));
        let dispatcher = dispatch_model(&vs, map, Some(&offload), None).unwrap();
        let out = dispatcher
            .run("lm_head", &x, |x| x.matmul(&head.tr()))
            .unwrap();
        assert!(out.equal(&expected));
    }

    #[test]
    fn an_offloaded_block_runs_and_its_weights_leave_again() {
        let dir = tempfile::tempdir().unwrap();
        let reference_vs = VarStore::new(Device::Cpu);
        let reference = nn::linear(reference_vs.root() / "block", 6, 3, Default::default());
        reference_vs
            .save(dir.path().join("model.safetensors"))
            .unwrap();
        let x = Tensor::randn([2, 6], (Kind::Float, Device::Cpu));
        let expected = reference.forward(&x);

        let vs = VarStore::new(Device::Cpu);
        let block = nn::linear(vs.root() / "block", 6, 3, Default::default());
        let offload = dir.path().join("offload");
        load_checkpoint_in_model(
            &vs,
            dir.path(),
            &LoadOptions {
                device_map: Some(vec![("block".into(), DeviceKey::Disk)]),
                offload_folder: Some(offload.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(block.ws.stride(), [0, 0], "a placeholder before");
        let folder = OffloadFolder::open(&offload).unwrap();
        let out = folder
            .with_module_on(&vs, "block", Device::Cpu, || block.forward(&x))
            .unwrap();
        assert!(out.allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!(block.ws.stride(), [0, 0], "a placeholder again after");

        // A panic inside the forward still puts the placeholder back.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            folder.with_module_on(&vs, "block", Device::Cpu, || panic!("forward failed"))
        }));
        assert!(caught.is_err());
        assert_eq!(block.ws.stride(), [0, 0]);

        let err = folder
            .with_module_on(&vs, "nothing", Device::Cpu, || ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing"), "{err}");
    }
}
