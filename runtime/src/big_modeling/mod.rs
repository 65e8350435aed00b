//! Big-model inference (in progress): sizes first; empty weights, device maps, loading and dispatch
//! follow.

mod sizes;

pub use sizes::{
    TensorMeta, compute_module_sizes, compute_module_total_buffer_size, convert_file_size_to_int,
    dtype_byte_size,
};
