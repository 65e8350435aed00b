//! Accelerate's big-model inference: model skeletons (shapes without memory), module sizes and memory
//! estimates, device maps (`infer_auto_device_map`, balanced memory, checks), checkpoint loading by
//! device map with CPU and disk offload in Accelerate's offload format, and dispatch: running a model
//! whose blocks sit on several GPUs, the CPU and disk, with hooks that move weights in before each block.

mod describe;
mod device_map;
mod dispatch;
mod dispatched;
mod estimate;
mod hooks;
mod load;
mod memory;
mod offload;
mod offload_format;
mod ordered_json;
mod read;
mod sizes;
mod skeleton;
mod slices;
mod var_store;

pub(crate) use describe::read_safetensors_entries;
pub(crate) use slices::{SliceRequest, read_slices};

pub use describe::{
    checkpoint_files, kind_from_safetensors, kind_from_torch_name, read_safetensors_header,
};
pub use device_map::{
    DeviceKey, DeviceMap, DeviceMapOptions, clean_device_map, get_max_layer_size,
    infer_auto_device_map,
};
pub use dispatch::{
    DeviceMapSpec, DispatchOptions, check_device_map, cpu_offload, device_of, disk_offload,
    dispatch_model, load_checkpoint_and_dispatch,
};
pub use dispatched::DispatchedModel;
pub use estimate::{
    calculate_maximum_sizes, convert_bytes, estimate_memory_table, estimate_training_usage,
};
pub use hooks::{DispatchedSequential, Dispatcher};
pub use load::{
    LoadOptions, LoadReport, device_key_of, load_checkpoint_in_model, load_state_dict,
    set_module_tensor_to_device,
};
pub use memory::{
    MaxMemory, get_balanced_memory, get_max_memory, parse_device_key, parse_max_memory,
};
pub use offload::OffloadFolder;
pub use offload_format::{
    load_offloaded_weight, load_offloaded_weights, offload_state_dict, offload_weight,
    save_offload_index,
};
pub use sizes::{
    TensorMeta, compute_module_sizes, compute_module_total_buffer_size, convert_file_size_to_int,
    dtype_byte_size,
};
pub use skeleton::ModelSkeleton;
pub use var_store::{find_tied_parameters, retie_parameters};
