//! Accelerate's dispatch hooks, for tch models: `dispatch_model` (in dispatch.rs) returns a [`Dispatcher`] that runs
//! each block of a model where the device map puts it. For a block on a GPU it moves the input there; for
//! a block offloaded to the CPU or the disk it brings the block's weights to the execution device for
//! that call only (Accelerate's `AlignDevicesHook` with offload), and releases them afterwards.
//!
//! tch modules cannot carry hooks, so the model's forward calls [`Dispatcher::run`] around each block,
//! or the blocks are wrapped in a [`DispatchedSequential`], whose forward does it for them.
//!
//! While an offloaded block runs, the next disk-offloaded block's weights are read on a background
//! thread into page-locked memory, so the disk read overlaps with the copies and compute of the blocks
//! before it; CPU-offloaded weights are page-locked at load (see `load_checkpoint_in_model`), so their
//! copies run at full bus speed.

use super::device_map::{DeviceKey, DeviceMap};
use super::load::device_key_of;
use super::offload_format::{OffloadIndex, offloaded_file};
use super::read::{ReadJob, Target, host_tensor, read_all, reader_threads};
use super::var_store::find_tied_parameters;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use tch::{Device, Tensor, nn::Module, nn::VarStore};

type Weights = Vec<(String, Tensor)>;

/// The offloaded variables: (variable, its name in `index.json`, its entry). A tied parameter the index
/// does not list (a checkpoint holds one name of a tied group) is read from the entry of a name tied to
/// it, so a module holding only the alias (an `lm_head` tied to the embedding) runs with real weights.
pub(super) type Entries = Vec<(String, String, serde_json::Value)>;

pub(super) fn offloaded_entries(vs: &VarStore, index: OffloadIndex) -> Entries {
    let mut entries: Entries = index
        .into_iter()
        .map(|(name, entry)| (name.clone(), name, entry))
        .collect();
    for group in find_tied_parameters(vs) {
        let Some((source, entry)) = group.iter().find_map(|n| {
            entries
                .iter()
                .find(|(v, _, _)| v == n)
                .map(|(_, s, e)| (s.clone(), e.clone()))
        }) else {
            continue;
        };
        for alias in &group {
            if !entries.iter().any(|(v, _, _)| v == alias) {
                entries.push((alias.clone(), source.clone(), entry.clone()));
            }
        }
    }
    entries
}

/// A background read of one disk-offloaded module's weights.
struct Prefetch {
    module: String,
    handle: JoinHandle<Result<Weights>>,
}

/// Offloaded variables brought over for one block, with what they held before: put back when dropped.
struct Restore(Vec<(Tensor, Tensor)>);

impl Drop for Restore {
    fn drop(&mut self) {
        for (mut var, before) in self.0.drain(..) {
            // Shapes and kinds are unchanged, so this cannot fail.
            let _ = var.f_set_data(&before);
        }
    }
}

/// Runs the blocks of a dispatched model where its device map says (see the module docs).
pub struct Dispatcher {
    variables: HashMap<String, Tensor>,
    map: DeviceMap,
    main: Device,
    folder: Option<(PathBuf, PathBuf, Entries)>,
    prefetch: Mutex<Option<Prefetch>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("map", &self.map)
            .field("main", &self.main)
            .finish_non_exhaustive()
    }
}

/// Whether `name` is `module` or lies below it (`blocks.1.fc` under `blocks.1`, not under `blocks.10`);
/// everything lies under the root, "".
pub(super) fn under(name: &str, module: &str) -> bool {
    module.is_empty()
        || name == module
        || (name.starts_with(module) && name.as_bytes().get(module.len()) == Some(&b'.'))
}

impl Dispatcher {
    /// A dispatcher over `vs`'s variables by `map`, running offloaded blocks on `main`; `folder` holds
    /// the offload folder, its index file and the entries of the offloaded variables.
    pub(super) fn new(
        vs: &VarStore,
        map: DeviceMap,
        main: Device,
        folder: Option<(PathBuf, PathBuf, Entries)>,
    ) -> Dispatcher {
        Dispatcher {
            variables: vs.variables(),
            map,
            main,
            folder,
            prefetch: Mutex::new(None),
        }
    }

    /// The names of the dispatched variables.
    pub(super) fn variable_names(&self) -> impl Iterator<Item = &str> {
        self.variables.keys().map(String::as_str)
    }

    /// The device that receives outputs and runs offloaded blocks.
    pub fn main_device(&self) -> Device {
        self.main
    }

    /// Where `module` runs: its GPU, or the main device when it is offloaded.
    pub fn execution_device(&self, module: &str) -> Device {
        match device_key_of(&self.map, module) {
            Some(DeviceKey::Gpu(i)) => Device::Cuda(i),
            _ => self.main,
        }
    }

    /// Runs `forward` for the block `module` (a dotted name under which its weights live) on `input`,
    /// moved to where the block runs. Offloaded weights are on that device for the call only.
    pub fn run(
        &self,
        module: &str,
        input: &Tensor,
        forward: impl FnOnce(&Tensor) -> Tensor,
    ) -> Result<Tensor> {
        let key = device_key_of(&self.map, module).ok_or_else(|| Error::InvalidValue {
            name: "module".into(),
            detail: format!("the device map places no module containing {module:?}"),
        })?;
        let device = self.execution_device(module);
        let x = input.to_device(device);
        if let DeviceKey::Gpu(_) = key {
            // Blocks on GPUs usually come first: start reading the first disk block while they run.
            if self
                .prefetch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                self.start_prefetch_after(module);
            }
            return Ok(forward(&x));
        }
        let mut names: Vec<&String> = self.variables.keys().filter(|n| under(n, module)).collect();
        names.sort();
        let mut from_disk = self.take_prefetched(module)?;
        if from_disk.is_none() {
            from_disk = Some(self.read_module(module, device.is_cuda())?);
        }
        let from_disk: HashMap<String, Tensor> =
            from_disk.unwrap_or_default().into_iter().collect();
        self.start_prefetch_after(module);
        // Dropped last: the variables get their placeholders (or host values) back however the forward
        // ends, a panic included.
        let mut restore = Restore(Vec::with_capacity(names.len()));
        let _guard = tch::no_grad_guard();
        let result = (|| {
            for name in names {
                let mut var = self.variables[name].shallow_clone();
                let source = from_disk.get(name).unwrap_or(&var);
                // Page-locked sources copy asynchronously; the stream keeps the order with compute. The
                // value takes the variable's kind (a tensor offloaded uncast under `dtype` has a
                // placeholder of the cast kind, as Accelerate's meta tensor has) and shape (a 0-d
                // variable stored by an older hasten as [1]).
                let value = source
                    .f_to_device_(device, var.kind(), true, false)
                    .and_then(|v| v.f_reshape(var.size()))
                    .map_err(|e| Error::torch("bringing an offloaded weight over", e))?;
                let before = var.detach();
                var.f_set_data(&value)
                    .map_err(|e| Error::torch("bringing an offloaded weight over", e))?;
                restore.0.push((var, before));
            }
            Ok(())
        })();
        result.map(|()| forward(&x))
    }

    /// Brings `output` to the main device (what Accelerate's top-level hook does with the model's output).
    pub fn to_main(&self, output: &Tensor) -> Tensor {
        output.to_device(self.main)
    }

    fn read_module(&self, module: &str, pinned: bool) -> Result<Weights> {
        let Some((folder, index_path, index)) = &self.folder else {
            return Ok(Vec::new());
        };
        read_module_from(folder, index_path, index, module, pinned)
    }

    fn take_prefetched(&self, module: &str) -> Result<Option<Weights>> {
        let mut slot = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
        // A read for a later module stays where it is.
        if slot.as_ref().is_none_or(|p| p.module != module) {
            return Ok(None);
        }
        let p = slot.take().expect("checked above");
        match p.handle.join() {
            Ok(weights) => weights.map(Some),
            Err(_) => Err(Error::InvalidValue {
                name: "prefetch".into(),
                detail: format!("reading {module}'s offloaded weights panicked"),
            }),
        }
    }

    /// Starts reading the weights of the first disk-offloaded module after `module` in map order.
    fn start_prefetch_after(&self, module: &str) {
        let Some((folder, index_path, index)) = &self.folder else {
            return;
        };
        let position = self
            .map
            .iter()
            .position(|(m, _)| under(module, m) || m == module);
        let next = self
            .map
            .iter()
            .skip(position.map_or(self.map.len(), |p| p + 1))
            .find(|(_, d)| *d == DeviceKey::Disk);
        let Some((next, _)) = next else { return };
        let mut slot = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|p| &p.module == next) {
            return; // already on its way
        }
        let (next, folder, index_path) = (next.clone(), folder.clone(), index_path.clone());
        let entries: Entries = index
            .iter()
            .filter(|(n, _, _)| under(n, &next))
            .cloned()
            .collect();
        let pinned = self.main.is_cuda();
        let module = next.clone();
        let handle = std::thread::spawn(move || {
            read_module_from(&folder, &index_path, &entries, &module, pinned)
        });
        // A read for a module the forward no longer goes to is dropped (its thread finishes alone).
        *slot = Some(Prefetch {
            module: next,
            handle,
        });
    }
}

/// Reads every offloaded tensor of `module` into host memory, the files split across threads.
fn read_module_from(
    folder: &Path,
    index_path: &Path,
    index: &[(String, String, serde_json::Value)],
    module: &str,
    pinned: bool,
) -> Result<Weights> {
    let mut paths = Vec::new();
    let mut jobs = Vec::new();
    let mut casts = Vec::new();
    for (name, stored_as, entry) in index.iter().filter(|(name, _, _)| under(name, module)) {
        let found = offloaded_file(folder, stored_as, entry, index_path)?;
        let tensor = host_tensor(&found.shape, found.kind, pinned);
        jobs.push(ReadJob {
            shard: paths.len(),
            name: name.clone(),
            start: found.start,
            len: found.byte_len(),
            target: Target::Tensor(tensor),
        });
        casts.push(found.cast);
        paths.push(found.path);
    }
    if jobs.is_empty() {
        return Ok(Vec::new()); // a CPU-offloaded block: nothing on disk
    }
    read_all(&paths, &jobs, reader_threads(), false)?;
    Ok(jobs
        .into_iter()
        .zip(casts)
        .filter_map(|(j, cast)| match j.target {
            Target::Tensor(t) => Some((j.name, cast.map_or(t.shallow_clone(), |k| t.to_kind(k)))),
            Target::File(_) => None,
        })
        .collect())
}

/// A sequence of named blocks run through a [`Dispatcher`]: its forward moves activations between
/// devices, brings offloaded weights in for each block, and returns the output on the main device.
#[derive(Debug)]
pub struct DispatchedSequential {
    blocks: Vec<(String, Box<dyn Module>)>,
    dispatcher: Dispatcher,
}

impl DispatchedSequential {
    /// `blocks` in execution order, each with the dotted name its weights live under.
    pub fn new(dispatcher: Dispatcher, blocks: Vec<(String, Box<dyn Module>)>) -> Self {
        Self { blocks, dispatcher }
    }

    /// The forward pass; an unreadable offloaded weight is an error naming its file. Each listed part
    /// runs as a block through the dispatcher's block hooks, as a [`super::DispatchedModel`]'s blocks do.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        super::dispatched::run_dispatched(&self.dispatcher, || {
            let mut x = xs.shallow_clone();
            for (name, block) in &self.blocks {
                x = crate::layers::hooks::run_block(
                    name,
                    &x,
                    Box::new(|x| block.forward(x)),
                    Box::new(|| unreachable!("dispatch never recomputes a block")),
                );
            }
            x
        })
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

impl Module for DispatchedSequential {
    /// Panics where [`DispatchedSequential::try_forward`] returns an error.
    fn forward(&self, xs: &Tensor) -> Tensor {
        super::dispatched::output_or_panic(self.try_forward(xs))
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::{cpu_offload, disk_offload, dispatch_model};
    use super::*;
    use crate::big_modeling::LoadOptions;
    use crate::layers;
    use crate::load_checkpoint_in_model;
    use tch::Kind;

    fn blocks(vs: &VarStore) -> Vec<(String, Box<dyn Module>)> {
        (0..4)
            .map(|i| {
                let layer = layers::linear(&(vs.root() / i), 8, 8, true);
                let block: Box<dyn Module> =
                    Box::new(tch::nn::func(move |x| layer.forward(x).tanh()));
                (i.to_string(), block)
            })
            .collect()
    }

    /// What [`offloaded`] sets up.
    struct Offloaded {
        vs: VarStore,
        model: Vec<(String, Box<dyn Module>)>,
        map: DeviceMap,
        offload: PathBuf,
        x: Tensor,
        expected: Tensor,
    }

    /// The test blocks saved as a float32 checkpoint in `dir`, then built empty and loaded with blocks 1
    /// and 3 on disk in `dir/offload` (with `dtype`, as Accelerate's `dtype` argument); an input in that
    /// dtype and the plain model's output for it.
    fn offloaded(dir: &Path, dtype: Option<Kind>) -> Offloaded {
        let mut reference = VarStore::new(Device::Cpu);
        let plain = blocks(&reference);
        reference.save(dir.join("model.safetensors")).unwrap();
        if dtype == Some(Kind::Double) {
            reference.double();
        }
        let x = Tensor::randn([3, 8], (dtype.unwrap_or(Kind::Float), Device::Cpu));
        let expected = plain
            .iter()
            .fold(x.shallow_clone(), |x, (_, b)| b.forward(&x));

        let vs = VarStore::new(Device::Cpu);
        let model = layers::init_empty_weights(|| blocks(&vs));
        let map: DeviceMap = vec![
            ("0".into(), DeviceKey::Cpu),
            ("1".into(), DeviceKey::Disk),
            ("2".into(), DeviceKey::Cpu),
            ("3".into(), DeviceKey::Disk),
        ];
        let offload = dir.join("offload");
        load_checkpoint_in_model(
            &vs,
            dir,
            &LoadOptions {
                device_map: Some(map.clone()),
                dtype,
                offload_folder: Some(offload.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        Offloaded {
            vs,
            model,
            map,
            offload,
            x,
            expected,
        }
    }

    #[test]
    fn dispatched_blocks_match_the_plain_model_and_weights_leave_again() {
        let dir = tempfile::tempdir().unwrap();
        let Offloaded {
            vs,
            model,
            map,
            offload,
            x,
            expected,
        } = offloaded(dir.path(), None);
        let dispatcher = dispatch_model(&vs, map, Some(&offload), None).unwrap();
        assert_eq!(dispatcher.execution_device("3"), Device::Cpu);
        let seq = DispatchedSequential::new(dispatcher, model);
        for _ in 0..2 {
            let y = seq.try_forward(&x).unwrap();
            assert!(y.allclose(&expected, 1e-6, 1e-6, false), "run twice, same");
        }
        let w3 = &vs.variables()["3.weight"];
        assert!(layers::is_empty_placeholder(w3), "disk weights leave again");
        assert!(!layers::is_empty_placeholder(&vs.variables()["2.weight"]));

        // A damaged .dat is an error naming the file; the model keeps its placeholders.
        std::fs::write(offload.join("1.weight.dat"), b"short").unwrap();
        let err = seq.try_forward(&x).unwrap_err().to_string();
        assert!(err.contains("1.weight.dat"), "{err}");
        assert!(layers::is_empty_placeholder(&vs.variables()["1.weight"]));
    }

    #[test]
    fn weights_offloaded_uncast_come_back_in_the_requested_dtype() {
        // As in Accelerate, with a dtype the disk keeps the checkpoint's float32 and the placeholder has
        // the dtype; the weights are cast when they are brought over for a forward.
        let dir = tempfile::tempdir().unwrap();
        let Offloaded {
            vs,
            model,
            map,
            offload,
            x,
            expected,
        } = offloaded(dir.path(), Some(Kind::Double));
        let index = std::fs::read_to_string(offload.join("index.json")).unwrap();
        assert!(
            index.contains("\"float32\"") && !index.contains("float64"),
            "{index}"
        );
        assert_eq!(vs.variables()["3.weight"].kind(), Kind::Double);
        let folder = crate::big_modeling::OffloadFolder::open(&offload).unwrap();
        let kind = folder
            .with_module_on(&vs, "3", Device::Cpu, || vs.variables()["3.weight"].kind())
            .unwrap();
        assert_eq!(kind, Kind::Double);
        let seq = DispatchedSequential::new(
            dispatch_model(&vs, map, Some(&offload), None).unwrap(),
            model,
        );
        let y = seq.try_forward(&x).unwrap();
        assert!(y.allclose(&expected, 1e-12, 1e-12, false));
    }

    #[test]
    fn cpu_and_disk_offload_run_every_block_from_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
        for disk in [false, true] {
            let vs = VarStore::new(Device::Cpu);
            let model = blocks(&vs);
            let expected = model
                .iter()
                .fold(x.shallow_clone(), |x, (_, b)| b.forward(&x));
            let dispatcher = if disk {
                let d = disk_offload(&vs, &dir.path().join("off"), Device::Cpu).unwrap();
                assert!(layers::is_empty_placeholder(&vs.variables()["0.weight"]));
                d
            } else {
                cpu_offload(&vs, Device::Cpu).unwrap()
            };
            let seq = DispatchedSequential::new(dispatcher, model);
            let y = seq.try_forward(&x).unwrap();
            assert!(y.allclose(&expected, 1e-6, 1e-6, false), "disk {disk}");
        }
        let vs = VarStore::new(Device::Cpu);
        let err = dispatch_model(&vs, vec![("".into(), DeviceKey::Disk)], None, None)
            .unwrap_err()
            .to_string();
        // Accelerate's message (the only disk module here is the root, "").
        assert!(
            err.ends_with(
                "We need an `offload_dir` to dispatch this model according to this `device_map`, the \
                 following submodules need to be offloaded: ."
            ),
            "{err}"
        );
    }
}
